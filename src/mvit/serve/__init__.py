"""`mvit serve`: the HTTP API and the web page, on FastAPI and uvicorn (the `serve` extra).

settings (what it is started with), uploads (multipart forms read into memory within the limits),
batcher (concurrent requests' images in one backbone pass), service (uploads to records and
overlays), app (the routes, the token, the errors, the page in page/).
"""
