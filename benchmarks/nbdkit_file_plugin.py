"""An image file served by nbdkit's python plugin: the `nbdkit-python` row of run.py.

    nbdkit -f -p 10809 -e bench python benchmarks/nbdkit_file_plugin.py file=disk.img

What a Python developer would write first to serve a file over NBD without writing a
server (Debian's nbdkit-plugin-python; the API is nbdkit-python-plugin(3)): open the file,
answer pread and pwrite with os.preadv / os.pwritev into and from nbdkit's buffers, nothing
else (no flush, trim, zero or extents callbacks: nbdkit then advertises none of them).
The thread model is parallel, as nbdkit's own python file example has it: the GIL is
released in preadv/pwritev, so requests of several nbdkit threads overlap there.

This file runs inside nbdkit's embedded interpreter (/usr/bin/python3), not in the venv.
"""

import os

import nbdkit

API_VERSION = 2

path = None  # the image, from file=PATH on nbdkit's command line


def config(key, value):
    global path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r}; this plugin takes file=PATH")
    path = os.path.abspath(value)


def config_complete():
    if path is None:
        raise RuntimeError("file=PATH is required")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def pread(fd, buf, offset, flags):
    if os.preadv(fd, [buf], offset) != len(buf):
        raise RuntimeError(f"short read at offset {offset}")


def pwrite(fd, buf, offset, flags):
    if os.pwritev(fd, [buf], offset) != len(buf):
        raise RuntimeError(f"short write at offset {offset}")
