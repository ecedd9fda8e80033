"""Rebuild the embedded dataset from the Debian archive: short description -> long description.

The archive changes over time, so the repository ships a snapshot (data/debian/pairs.jsonl, tracked by
DVC) and keeps this extractor to rebuild it. Steps:
  1. `apt-get update` into a private lists folder with English translations switched on
     (Debian images often set Acquire::Languages "none");
  2. read the binary `Packages` lists (for the Source field) and the `Translation-en` lists
     (for the long descriptions) with apt-helper, which decompresses whatever apt stored;
  3. keep one binary package per source package, drop duplicate queries and passages.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from drscaling.errors import DrscalingError
from drscaling.files import write_jsonl

APT_HELPER = "/usr/lib/apt/apt-helper"


def fetch_lists(lists_dir: Path) -> None:
    (lists_dir / "partial").mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", f"-oDir::State::Lists={lists_dir}", "-oAcquire::Languages=en", "update"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DrscalingError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")


def cat_list(path: Path) -> str:
    proc = subprocess.run([APT_HELPER, "cat-file", str(path)], capture_output=True)
    if proc.returncode != 0:
        raise DrscalingError(f"apt-helper could not read {path}: {proc.stderr.decode()[-500:]}")
    return proc.stdout.decode("utf-8", errors="replace")


def stanzas(text: str) -> Iterator[dict[str, str]]:
    """Parse deb822 paragraphs; continuation lines are kept with their leading space."""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.split("\n"):
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def long_description(body: str) -> str:
    """Debian's extended-description markup: ' .' is a blank line, one leading space is dropped."""
    lines = []
    for line in body.split("\n"):
        line = line[1:] if line.startswith(" ") else line
        lines.append("" if line.strip() == "." else line.rstrip())
    text = "\n".join(lines).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def extract_pairs(lists_dir: Path) -> list[dict[str, str]]:
    packages = sorted(lists_dir.glob("*_binary-*_Packages*"))
    translations = sorted(lists_dir.glob("*_i18n_Translation-en*"))
    if not packages or not translations:
        raise DrscalingError(f"{lists_dir}: no Packages or Translation-en lists (fetch them first)")
    source_of: dict[str, str] = {}
    for path in tqdm(packages, desc="Packages lists"):
        for st in stanzas(cat_list(path)):
            if "Package" in st:
                source_of[st["Package"]] = st.get("Source", st["Package"]).split(" ")[0]
    described: dict[str, tuple[str, str]] = {}
    for path in tqdm(translations, desc="Translation-en lists"):
        for st in stanzas(cat_list(path)):
            desc = st.get("Description-en", "")
            short, _, body = desc.partition("\n")
            if st.get("Package") in source_of and short.strip() and body.strip():
                described[st["Package"]] = (short.strip(), long_description(body))
    return select_pairs(described, source_of)


def select_pairs(
    described: dict[str, tuple[str, str]], source_of: dict[str, str]
) -> list[dict[str, str]]:
    """One binary per source (the one named like the source, else the shortest name), unique texts."""
    by_source: dict[str, list[str]] = {}
    for package in described:
        by_source.setdefault(source_of[package], []).append(package)
    seen_q: set[str] = set()
    seen_p: set[str] = set()
    rows = []
    for source in sorted(by_source):
        package = min(by_source[source], key=lambda p: (p != source, len(p), p))
        query, passage = described[package]
        key_q, key_p = query.lower(), passage.lower()
        if key_q in seen_q or key_p in seen_p:
            continue
        seen_q.add(key_q)
        seen_p.add(key_p)
        rows.append({"package": package, "source": source, "query": query, "passage": passage})
    return rows


def extract(dest: str | Path, lists_dir: str | Path, fetch: bool = True) -> int:
    lists_dir = Path(lists_dir)
    if fetch:
        fetch_lists(lists_dir)
    rows = extract_pairs(lists_dir)
    if not rows:
        raise DrscalingError("the Debian lists yielded no pairs")
    return write_jsonl(dest, rows)
