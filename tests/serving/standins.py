"""Stand-in decoders for the server's tests, run inside its decode processes (so importable by name, light).

They stand for what a decoder may do with a hostile file, independently of how the decoders themselves are
hardened: hold the one DICOM decode for a while, or run past any time limit.
"""

from __future__ import annotations

import time

from datamodules.dicom import is_dicom
from serving.images import decode_upload

DICOM_SECONDS = 2.0


def slow_dicom_decode(data: bytes, *args):
    """`decode_upload`, taking DICOM_SECONDS longer for a DICOM (as a large one does)."""
    if is_dicom(data[:132]):
        time.sleep(DICOM_SECONDS)
    return decode_upload(data, *args)


def endless_jpeg_decode(data: bytes, *args):
    """`decode_upload`, but a JPEG spins the CPU until the time limit stops it: a decoder cost that no header
    check catches (the real scan bombs are refused from their headers now, see tests/datamodules)."""
    if data[:2] == b"\xff\xd8":
        while True:
            pass
    return decode_upload(data, *args)
