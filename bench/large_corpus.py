"""A corpus of >= 100M tokens for the scale bench: Debian documentation packages, pinned by sha256.

    make corpus-large       # = python -m bench.large_corpus --out bench/out/large/corpus.jsonl.zst

Packages (Debian bookworm, each .deb downloaded once by ``apt-get download`` and checked against its
sha256 on every run): the Linux 6.1 kernel's reStructuredText and plain-text documentation, and the
HTML of Rust's standard library and books at two versions (1.63, 1.85), of OpenJDK 17's API, of
pandas 1.5 and of GHC 9.0's libraries.
One document per file; HTML is reduced to its text (script and style dropped, block elements end a
line). rustdoc and javadoc pages share long boilerplate (navigation, trait listings, "Uses of Class"
pages), and the two Rust versions share most of their text: the corpus has large LSH buckets, exact
copies and near-duplicates of its own, which is what the chunk stage has to cope with at scale.

Planted pairs, for checking: the LSH buckets of the chunk stage's defaults (5-gram MinHash, 16 bands
of 8 rows, the given tokenizer) are computed over every document; in each of the ``--buckets``
largest, ``--plants`` members get an exact copy and as many others a near copy (one word in
``NEAR_EDIT`` replaced). Every planted record's ``meta`` says what it is and which document it
copies (``planted``, ``of``); ``<out>.planted.json`` lists them with their bucket's size. The output
is deterministic: same packages and arguments, same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import html.parser
import json
import logging
import random
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import zstandard

from bench.debian_packages import pinned_package_root
from pipeline import minhash
from pipeline.chunk_pipeline import ChunkConfig
from retro_db import layout
from retro_db.corpus import document_tokens, normalize_text
from retro_db.tokenizer import EOS, load_lm_tokenizer, special_id

log = logging.getLogger("bench.large_corpus")

PACKAGES = {  # apt spec -> (sha256 of the .deb, folder inside it, file suffixes read)
    "linux-doc-6.1=6.1.192-3": (
        "f18dfe28dcab7bdbf9185be16b9521f5841277a6a96c374a6683a648d5d5fa4f",
        "usr/share/doc/linux-doc-6.1/Documentation",
        (".rst.gz", ".txt.gz", ".rst", ".txt"),
    ),
    "rust-doc=1.63.0+dfsg1-2": (
        "96ef96fe6df87d939ca713bd7df3d15c2b778ccb892eca025c4ee504146f697b",
        "usr/share/doc/rust-doc/html",
        (".html",),
    ),
    "rust-web-doc=1.85.0+dfsg3-1~deb12u3": (
        "ae4192337b72aff79a7916a06a57d71427dc9bc4e8d6c1b4bf544f34762f1973",
        "usr/share/doc/rust-web-doc/html",
        (".html",),
    ),
    "openjdk-17-doc=17.0.21.1+2-1~deb12u1": (
        "3e04db24dbcb31d598774973998f1d8212e3424e288befbfef235077325f841d",
        "usr/share/doc/openjdk-17-jre-headless",  # openjdk-17-doc/ links here
        (".html",),
    ),
    "python-pandas-doc=1.5.3+dfsg-2": (
        "4998405ff6b12432f46594963e95554ade1104705795428396345fca58d853f8",
        "usr/share/doc/python-pandas-doc/html",
        (".html",),
    ),
    "ghc-doc=9.0.2-4": (
        "a7c77e36c8906f82eef411ceeba13b7d663b7766a5ecc6659e3405889e0429c9",
        "usr/share/doc/ghc-doc/html",
        (".html",),
    ),
}
NEAR_EDIT = 50  # a near copy replaces one word in 50: 5-gram Jaccard ~0.8-0.9, above the 0.8 threshold on average
MIN_CHARS = 200  # pages with less text (redirects, empty frames) are left out

_BLOCK_TAGS = {"p", "div", "li", "tr", "br", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "section", "dt", "dd"}
_SKIP_TAGS = {"script", "style", "head"}
_BLANKS = re.compile(r"[ \t\r\f\v]+")
_NEWLINES = re.compile(r"\n\s*\n+")


class _TextOf(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_TAGS:
            self.skipping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _SKIP_TAGS:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_text(markup: str) -> str:
    """The visible text of an HTML page: blocks on their own lines, runs of blanks collapsed."""
    parser = _TextOf()
    parser.feed(markup)
    parser.close()
    lines = (_BLANKS.sub(" ", line).strip() for line in "".join(parser.parts).split("\n"))
    return _NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def file_text(path: Path) -> str:
    raw = gzip.open(path).read() if path.name.endswith(".gz") else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    return html_text(text) if path.name.endswith(".html") else text


def package_records(root: Path, spec: str, pool: ProcessPoolExecutor) -> list[dict]:
    """One record per file of the package's documentation folder, in path order."""
    _, folder, suffixes = PACKAGES[spec]
    paths = sorted(p for p in (root / folder).rglob("*") if p.is_file() and p.name.endswith(suffixes))
    records = [
        {"text": text, "meta": {"package": spec, "path": path.relative_to(root).as_posix()}}
        for path, text in zip(paths, pool.map(file_text, paths, chunksize=64))
        if len(text) >= MIN_CHARS
    ]
    log.info("%s: %d documents, %.1f MB", spec, len(records), sum(len(r["text"]) for r in records) / 1e6)
    return records


def lsh_buckets(texts: list[str], tokenizer_path: str, config: ChunkConfig) -> tuple[list[list[bytes]], int]:
    """Each text's band keys as the chunk stage computes them (same tokenizer, n-gram, bands), and the token count."""
    tokenizer = load_lm_tokenizer(tokenizer_path)
    eos = special_id(tokenizer, EOS)
    seeds = minhash.permutation_seeds(config.num_perm)
    keys, tokens = [], 0
    for start in range(0, len(texts), 4096):
        batch = [normalize_text(t) for t in texts[start : start + 4096]]
        for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
            ids = document_tokens(encoding.ids, eos)
            tokens += len(ids)
            sig = minhash.signature(ids, ngram=config.dedup_ngram, seeds=seeds)
            keys.append(minhash.band_keys(sig, bands=config.lsh_bands, rows=config.lsh_rows))
        log.info("signatures: %d of %d documents", len(keys), len(texts))
    return keys, tokens


def near_copy(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, len(words) // NEAR_EDIT)):
        words[i] = f"planted{rng.randrange(10**6)}"
    return " ".join(words)


def plant(records: list[dict], keys: list[list[bytes]], *, buckets: int, plants: int, seed: int) -> list[dict]:
    """Exact and near copies of members of the largest LSH buckets, appended to ``records``."""
    sizes = Counter(k for doc in keys for k in doc)
    members: dict[bytes, list[int]] = {}
    for i, doc in enumerate(keys):
        for k in doc:
            members.setdefault(k, []).append(i)
    rng, planted, used = random.Random(seed), [], set()
    for key, size in sizes.most_common(buckets):
        fresh = [i for i in members[key] if i not in used]
        for n, i in enumerate(rng.sample(fresh, min(len(fresh), 2 * plants))):
            used.add(i)
            kind = "exact" if n % 2 == 0 else "near"
            original = records[i]
            text = original["text"] if kind == "exact" else near_copy(original["text"], rng)
            of = original["meta"]["path"]
            planted.append({"planted": kind, "of": of, "package": original["meta"]["package"], "bucket_size": size})
            records.append({"text": text, "meta": {"planted": kind, "of": of, "package": original["meta"]["package"]}})
    return planted


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out/large/corpus.jsonl.zst")
    parser.add_argument("--work", default=".corpus-src/large", help="where the .debs are downloaded and unpacked")
    parser.add_argument(
        "--tokenizer", default=layout.tokenizer_path("db"), help="the tokenizer the chunk stage will use"
    )
    parser.add_argument("--buckets", type=int, default=5, help="the largest LSH buckets that get planted copies")
    parser.add_argument("--plants", type=int, default=10, help="exact copies (and as many near copies) per bucket")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with ProcessPoolExecutor() as pool:  # HTML parsing is pure Python: one process per core
        records = [
            r
            for spec, (sha256, _, _) in PACKAGES.items()
            for r in package_records(
                pinned_package_root(Path(args.work) / spec.split("=")[0], spec, sha256), spec, pool
            )
        ]
    keys, tokens = lsh_buckets([r["text"] for r in records], args.tokenizer, ChunkConfig())
    planted = plant(records, keys, buckets=args.buckets, plants=args.plants, seed=args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    with open(str(out) + ".tmp", "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3, threads=-1).compress(data))
    Path(str(out) + ".tmp").rename(out)
    Path(str(out) + ".planted.json").write_text(json.dumps(planted, indent=1) + "\n")
    print(
        f"{out}: {len(records)} documents, {len(data) / 1e6:.0f} MB, {tokens:,} tokens before planting "
        f"({args.tokenizer}); {len(planted)} planted copies in buckets of "
        f"{sorted({p['bucket_size'] for p in planted}, reverse=True)}"
    )


if __name__ == "__main__":
    main()
