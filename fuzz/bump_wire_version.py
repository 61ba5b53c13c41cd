#!/usr/bin/env python3
"""Rewrites the committed fuzz corpora for a new wire version, so they still reach the decoders.

    fuzz/bump_wire_version.py OLD NEW     (from the repository root)

Only the version byte changes: the first byte of a `wire_message` input; the first byte of each
message step of the session and authorized-session targets (header byte, then steps: a tag below
0x80, a little-endian u16 length, the message; a tag from 0x80 is a timer). The control targets'
frames carry the version byte after their first (selector) byte. Inputs whose bodies changed
shape in the new version simply stop decoding; the fuzzer finds their new forms."""
import os
import sys

old, new = int(sys.argv[1]), int(sys.argv[2])
root = 'fuzzing'


def steps(data):
    out = bytearray(data)
    i, n = 1, 0
    while i < len(out) and n < 256:
        tag = out[i]
        i += 1
        n += 1
        if tag >= 0x80:
            continue
        if i + 2 > len(out):
            break
        length = out[i] | (out[i + 1] << 8)
        i += 2
        if length >= 1 and i < len(out) and out[i] == old:
            out[i] = new
        i += length
    return bytes(out)


def second(data):
    return data[:1] + bytes([new]) + data[2:] if len(data) > 1 and data[1] == old else data


changed = 0
# Regressions keep the version they were found at (a -vN suffix says which); copy one to a new
# name and rewrite that by hand if it must reach the decoder at the new version.
for kind in ['corpus']:
    for target, fix in [('wire_message', lambda d: bytes([new]) + d[1:] if d[:1] == bytes([old]) else d),
                        ('session_responder', steps), ('session_initiator', steps),
                        ('auth_responder', steps), ('auth_initiator', steps),
                        ('control', second), ('relay_control', second)]:
        folder = os.path.join(root, kind, target)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            data = open(path, 'rb').read()
            fixed = fix(data)
            if fixed != data:
                open(path, 'wb').write(fixed)
                changed += 1
print(f'{changed} inputs rewritten from version {old} to {new}')
