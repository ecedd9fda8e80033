"""From a model's raw output to one query: parse, clean, filter, pick."""

from __future__ import annotations

import ast
import json
import random
import re
from collections.abc import Sequence
from typing import Any

from drscaling.annotation.bounds import AnnotationLimits
from drscaling.annotation.prompts import CHAT_PROMPTS
from drscaling.errors import DrscalingError

FENCE = re.compile(r"```[a-zA-Z]*")
KEYED = re.compile(r"""["']?query\s*(\d+)["']?\s*[:=]\s*(["'])(.*?)(?:(?<!\\)\2|$)""", re.I | re.M | re.S)
LISTED = re.compile(r"^\s*(?:\d+[.)]|[-*])\s+(.+?)\s*$", re.M)
QUOTES = "\"'`“”‘’"


def parse_json_queries(text: str) -> list[str]:
    """Queries from an Appendix-A style answer, however messy: code fences, text around the
    object, single quotes, a cut-off object, or at worst a numbered list. Key order query1..N."""
    text = FENCE.sub("", text or "")
    start = text.find("{")
    if start >= 0:
        end = text.rfind("}")
        blob = text[start:end + 1] if end > start else text[start:]
        for parse in (json.loads, ast.literal_eval):
            try:
                obj = parse(blob)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            found = _strings_in(obj)
            if found:
                return found
    keyed = sorted(((_key_number(m.group(1)), m.group(3)) for m in KEYED.finditer(text)), key=lambda t: t[0])
    if keyed:
        return [_unescape(v) for _, v in keyed]
    return [m.group(1) for m in LISTED.finditer(text)]


def _key_number(digits: str) -> int:
    """A key's number for ordering: int() refuses strings of more than 4,300 digits (a model that
    loops on digits writes them), and no answer has that many queries."""
    return int(digits) if len(digits) <= 18 else 10**18


def _strings_in(obj: Any) -> list[str]:
    """String values of a parsed answer, query keys in numeric order first. Walked with an explicit
    stack: a parsed answer can be nested deeper than Python's recursion limit allows to recurse."""
    def order(k: Any) -> tuple[int, str]:
        m = re.search(r"(\d+)", str(k))
        return (_key_number(m.group(1)) if m else 10**6, str(k))

    found: list[str] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(item[k] for k in reversed(sorted(item, key=order)))
    return found


def _unescape(value: str) -> str:
    try:
        return json.loads(f'"{value}"')
    except json.JSONDecodeError:
        return value


def parse_query_line(text: str) -> list[str]:
    """A completion prompt ends in "Query:": the answer is the first line the model writes."""
    line = (text or "").lstrip(" \t").split("\n", 1)[0]
    line = re.sub(r"^\s*query\s*:\s*", "", line, flags=re.I)
    return [line] if line.strip() else []


def parse_output(text: str, prompt_kind: str) -> list[str]:
    return parse_json_queries(text) if prompt_kind in CHAT_PROMPTS else parse_query_line(text)


def clean_query(query: str) -> str:
    query = " ".join(str(query).split())
    return query.strip(QUOTES + " ").strip()


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def is_copy(query: str, passage: str, min_words: int = 8) -> bool:
    """The passage itself, or a verbatim span of it long enough to be a sentence rather than a
    query (the small model's failure mode); short spans like a product name are fine."""
    q, p = _norm(query), _norm(passage)
    if not q:
        return False
    if q == p or p in q:
        return True
    return len(q.split()) >= min_words and f" {q} " in f" {p} "


def valid_queries(
    candidates: Sequence[str], passage: str, limits: AnnotationLimits, copy_min_words: int = 8
) -> list[str]:
    """Cleaned candidates minus empty ones, length outliers, passage copies and duplicates."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in candidates:
        q = clean_query(raw)
        if not q or not limits.min_query_chars <= len(q) <= limits.max_query_chars:
            continue
        if is_copy(q, passage, copy_min_words) or _norm(q) in seen:
            continue
        seen.add(_norm(q))
        out.append(q)
    return out


def pick_query(queries: Sequence[str], pid: str, seed: int, how: str = "random") -> str:
    """Deterministic per passage: the choice depends on (seed, pid) only, not on batch or order,
    so a resumed run picks what an uninterrupted one would have."""
    if not queries:
        raise ValueError("no queries to pick from")
    if how == "first":
        return queries[0]
    if how != "random":
        raise DrscalingError(f"pick must be 'random' or 'first' (got {how!r})")
    return random.Random(f"{seed}:{pid}").choice(list(queries))
