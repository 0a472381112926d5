"""The bottom stage: how a command runs on this machine, not what it computes. Devices and
precision (`precision`), torchrun's processes (`distributed`), progress bars (`progress`) and
files written whole (`files`). It imports no other stage; every stage may import it."""
