"""Tests of blockproxy.backends: parsing, validation messages, reload and diff."""

from __future__ import annotations

import asyncio
import logging
import os
import textwrap
from pathlib import Path

import pytest

from blockproxy.backends import (
    BackendsError,
    BackendSpec,
    BackendsWatcher,
    diff_backends,
    format_for_path,
    load_backends,
    normalise_url,
    parse_backends,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def yaml_backends(text: str) -> list[BackendSpec]:
    return parse_backends(textwrap.dedent(text), "yaml", "backends.yaml")


def yaml_error(text: str) -> BackendsError:
    with pytest.raises(BackendsError) as info:
        yaml_backends(text)
    return info.value


# --- parsing ---------------------------------------------------------------------------------

def test_yaml_full_entry() -> None:
    specs = yaml_backends("""
        backends:
          - url: http://127.0.0.1:8001/
            name: gpu-a
            profile: llama-3.1-8b-h100-tp1
            max_num_seqs: 128
            max_num_batched_tokens: 4096
            num_gpu_blocks: 20000
            block_size: 32
            max_model_len: 32768
            weight: 2
            state: draining
            models: [m1, m2]
    """)
    assert specs == [BackendSpec(
        url="http://127.0.0.1:8001", name="gpu-a", profile="llama-3.1-8b-h100-tp1",
        max_num_seqs=128, max_num_batched_tokens=4096, num_gpu_blocks=20000, block_size=32,
        max_model_len=32768, weight=2.0, state="draining", models=("m1", "m2"))]
    assert isinstance(specs[0].weight, float)


def test_objectives_per_model_the_strictest_wins() -> None:
    from blockproxy.cluster.view import ClusterView
    specs = yaml_backends("""
        defaults: {slo_ttft_ms: 1500}
        backends:
          - {url: "http://a:1", models: [chat]}
          - {url: "http://b:1", models: [chat], slo_ttft_ms: 800, slo_e2e_ms: 20000}
          - {url: "http://c:1", models: [batch], slo_ttft_ms: 0}
          - {url: "http://d:1", models: [other]}
    """)
    assert specs[1].slo_ttft_ms == 800.0 and specs[0].slo_e2e_ms is None
    view = ClusterView("llama-3.1-8b-h100-tp1", slo_ttft_ms=3000, slo_e2e_ms=60000)
    view.apply(specs)
    assert view.objective("chat") == (0.8, 20.0)
    assert view.objective("batch") == (0.0, 60.0)  # 0: explicitly none
    assert view.objective("other") == (1.5, 60.0)  # the file's default
    view.apply([BackendSpec(url="http://e:1", name="e", models=("x",))])
    assert view.objective("x") == (3.0, 60.0)  # the proxy's
    for bad in ("-1", "fast", "true", ".inf"):
        err = yaml_error(f"backends: [{{url: 'http://a:1', slo_ttft_ms: {bad}}}]")
        assert err.field == "backends[0].slo_ttft_ms" and "milliseconds" in err.reason


def test_yaml_defaults_and_bare_urls() -> None:
    specs = yaml_backends("""
        defaults:
          profile: p1
          max_num_seqs: 64
        backends:
          - http://h1:8001
          - url: http://h2:8002
            max_num_seqs: 32
            profile: p2
    """)
    assert [(s.name, s.profile, s.max_num_seqs) for s in specs] == [
        ("h1:8001", "p1", 64), ("h2:8002", "p2", 32)]
    assert specs[0].state == "active" and specs[0].weight == 1.0 and specs[0].models is None


def test_yaml_top_level_list() -> None:
    specs = yaml_backends("""
        - http://a:1
        - {url: "https://b/prefix/", name: b}
    """)
    assert [(s.url, s.name) for s in specs] == [("http://a:1", "a:1"),
                                                ("https://b/prefix", "b")]


def test_yaml_merge_keys() -> None:
    specs = yaml_backends("""
        backends:
          - &a {url: "http://a:1", max_num_seqs: 8}
          - {<<: *a, url: "http://b:1"}
    """)
    assert [(s.name, s.max_num_seqs) for s in specs] == [("a:1", 8), ("b:1", 8)]


def test_single_model_string() -> None:
    specs = yaml_backends("""
        backends:
          - {url: "http://a:1", models: m}
    """)
    assert specs[0].models == ("m",)


def test_toml() -> None:
    text = textwrap.dedent("""
        [defaults]
        profile = "p"
        weight = 0.5

        [[backends]]
        url = "http://a:1"

        [[backends]]
        url = "http://b:2"
        name = "b"
        state = "standby"
        models = ["m"]
    """)
    specs = parse_backends(text, "toml", "backends.toml")
    assert specs == [
        BackendSpec(url="http://a:1", name="a:1", profile="p", weight=0.5),
        BackendSpec(url="http://b:2", name="b", profile="p", weight=0.5, state="standby",
                    models=("m",)),
    ]


def test_plain_list() -> None:
    text = "# my instances\n\nhttp://a:8001/\n  http://b:8002  # second\n"
    specs = parse_backends(text, "list", "backends.txt")
    assert [(s.url, s.name) for s in specs] == [("http://a:8001", "a:8001"),
                                                ("http://b:8002", "b:8002")]


def test_plain_list_bad_line_named() -> None:
    with pytest.raises(BackendsError, match=r"^hosts:3: backends\[1\]\.url: .*ftp"):
        parse_backends("http://a:1\n\nftp://b:2\n", "list", "hosts")


def test_format_for_path() -> None:
    assert format_for_path("x.yaml") == "yaml"
    assert format_for_path("X.YML") == "yaml"
    assert format_for_path("x.toml") == "toml"
    assert format_for_path("backends") == "list"
    assert format_for_path("hosts.txt") == "list"
    with pytest.raises(ValueError):
        parse_backends("", "json", "x")


def test_shipped_examples_agree() -> None:
    from_yaml = load_backends(EXAMPLES / "backends.yaml")
    from_toml = load_backends(EXAMPLES / "backends.toml")
    assert from_yaml == from_toml
    assert len(from_yaml) >= 2
    assert all(s.profile == "llama-3.1-8b-h100-tp1" for s in from_yaml)


@pytest.mark.parametrize("url, expected", [
    ("http://h:8000", "http://h:8000"),
    ("HTTP://Host:8000/", "http://host:8000"),
    ("https://h/v/", "https://h/v"),
    ("http://[::1]:8000", "http://[::1]:8000"),
    (" http://h ", "http://h"),
])
def test_normalise_url(url: str, expected: str) -> None:
    assert normalise_url(url) == expected


@pytest.mark.parametrize("url", [
    "h:8000", "127.0.0.1:8000", "ftp://h", "http://", "http:///x", "http://u:p@h",
    "http://h?x=1", "http://h#f", "http://h:99999", "http://h x", "",
])
def test_normalise_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        normalise_url(url)


def test_default_name_uses_scheme_port() -> None:
    specs = yaml_backends("""
        - http://a
        - https://a
        - http://[::1]:9
    """)
    assert [s.name for s in specs] == ["a:80", "a:443", "[::1]:9"]


# --- validation errors name the line and the field -------------------------------------------

@pytest.mark.parametrize("entry, field, reason", [
    ("max_num_seqs: -3", "max_num_seqs", "expected a positive integer, got -3"),
    ("max_num_batched_tokens: 1.5", "max_num_batched_tokens", "positive integer, got 1.5"),
    ("num_gpu_blocks: true", "num_gpu_blocks", "positive integer, got True"),
    ("block_size: '16'", "block_size", "positive integer, got '16'"),
    ("max_model_len: 0", "max_model_len", "positive integer, got 0"),
    ("weight: 0", "weight", "expected a number > 0, got 0"),
    ("weight: .nan", "weight", "expected a number > 0"),
    ("state: paused", "state", "expected one of active, draining, standby, got 'paused'"),
    ("name: ''", "name", "expected a non-empty string"),
    ("profile: 3", "profile", "expected a non-empty string, got 3"),
    ("models: []", "models", "expected a non-empty list of model names"),
    ("models: {a: 1}", "models", "expected a non-empty list of model names"),
])
def test_bad_field_names_line_and_field(entry: str, field: str, reason: str) -> None:
    text = f"""\
backends:
  - url: http://a:1
  - url: http://b:2
    {entry}
"""
    err = yaml_error(text)
    assert str(err).startswith(f"backends.yaml:4: backends[1].{field}: ")
    assert reason in str(err)
    assert (err.line, err.field) == (4, f"backends[1].{field}")


def test_example_message_from_the_issue() -> None:
    text = "backends:\n" + "".join(f"  - url: http://h:{p}\n" for p in (1, 2)) + \
        "    name: second\n    weight: 1\n    max_num_seqs: -3\n"
    err = yaml_error(text)
    assert str(err) == ("backends.yaml:6: backends[1].max_num_seqs: "
                        "expected a positive integer, got -3")


def test_bad_url_names_line() -> None:
    err = yaml_error("""\
        backends:
          - url: http://a:1
          - url: gpu-3:8000
    """)
    assert str(err).startswith("backends.yaml:3: backends[1].url: expected an http")


def test_missing_url() -> None:
    err = yaml_error("""\
        backends:
          - url: http://a:1
          - name: b
            max_num_seqs: 4
    """)
    assert str(err) == "backends.yaml:3: backends[1].url: missing"


def test_unknown_key_suggests_closest() -> None:
    err = yaml_error("""\
        backends:
          - url: http://a:1
            max_num_seq: 4
    """)
    assert str(err).startswith("backends.yaml:3: backends[0].max_num_seq: unknown key; "
                               "did you mean 'max_num_seqs'?")


def test_unknown_top_level_key_suggests() -> None:
    err = yaml_error("""\
        backend:
          - url: http://a:1
    """)
    assert str(err).startswith("backends.yaml:1: backend: unknown key; did you mean 'backends'?")


def test_unknown_default_key_and_non_default_field() -> None:
    err = yaml_error("""\
        defaults:
          profil: p
        backends: [http://a:1]
    """)
    assert str(err).startswith("backends.yaml:2: defaults.profil: unknown key; "
                               "did you mean 'profile'?")
    err = yaml_error("""\
        defaults:
          name: x
        backends: [http://a:1]
    """)
    assert str(err) == ("backends.yaml:2: defaults.name: cannot be a default; "
                        "set it on each instance")


def test_bad_default_value_names_field() -> None:
    err = yaml_error("""\
        defaults:
          weight: -1
        backends: [http://a:1]
    """)
    assert str(err).startswith("backends.yaml:2: defaults.weight: expected a number > 0")


def test_duplicate_yaml_key() -> None:
    err = yaml_error("""\
        backends:
          - url: http://a:1
            weight: 1
            weight: 2
    """)
    assert str(err) == "backends.yaml:4: backends[0].weight: duplicate key"


@pytest.mark.parametrize("text, reason", [
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("backends: []\n", "backends: no backends: the list is empty"),
    ("defaults: {profile: p}\n", "missing the 'backends:' list"),
    ("backends: http://a:1\n", "backends: expected a list of instances"),
    ("backends:\n  - [http://a:1]\n", "backends[0]: expected a mapping with 'url'"),
    ("just a string\n", "expected a mapping with a 'backends:' list, or a list"),
    ("defaults: [1]\nbackends: [http://a:1]\n", "defaults: expected a mapping"),
])
def test_bad_shapes(text: str, reason: str) -> None:
    assert reason in str(yaml_error(text))


def test_empty_list_error_names_line() -> None:
    assert str(yaml_error("defaults: {profile: p}\nbackends: []\n")) == \
        "backends.yaml:2: backends: no backends: the list is empty"


def test_yaml_syntax_error_names_line() -> None:
    err = yaml_error("backends:\n  - url: http://a:1\n    name: [unclosed\n")
    assert str(err).startswith("backends.yaml:") and "invalid YAML" in str(err)
    assert err.line is not None and err.line >= 3


def test_duplicate_names_and_urls() -> None:
    err = yaml_error("""\
        backends:
          - {url: "http://a:1", name: x}
          - {url: "http://b:1", name: x}
    """)
    assert str(err) == ("backends.yaml:3: backends[1].name: duplicate name 'x' "
                        "(also backends[0], line 2)")
    err = yaml_error("""\
        backends:
          - {url: "http://a:1", name: x}
          - {url: "http://a:1/", name: y}
    """)
    assert str(err).startswith("backends.yaml:3: backends[1].url: duplicate url 'http://a:1'")
    # Same host:port behind two prefixes: the default names clash and the fix is named.
    err = yaml_error("""\
        backends:
          - http://a:1/v1
          - http://a:1/v2
    """)
    assert str(err).endswith("give them distinct names")


def test_toml_errors_name_field() -> None:
    with pytest.raises(BackendsError) as info:
        parse_backends('[[backends]]\nurl = "http://a:1"\nmax_num_seqs = -3\n', "toml", "b.toml")
    assert str(info.value) == "b.toml: backends[0].max_num_seqs: expected a positive integer, " \
        "got -3"
    with pytest.raises(BackendsError, match=r"^b\.toml: backends\[0\]\.wieght: unknown key; "
                                            r"did you mean 'weight'\?"):
        parse_backends('[[backends]]\nurl = "http://a:1"\nwieght = 2\n', "toml", "b.toml")
    with pytest.raises(BackendsError, match=r"^b\.toml: backend: unknown key; did you mean"):
        parse_backends('[[backend]]\nurl = "http://a:1"\n', "toml", "b.toml")
    with pytest.raises(BackendsError, match=r"missing the \[\[backends\]\] tables"):
        parse_backends('[defaults]\nprofile = "p"\n', "toml", "b.toml")


def test_toml_syntax_error_has_line() -> None:
    with pytest.raises(BackendsError) as info:
        parse_backends('[[backends]]\nurl = "http://a:1"\nweight = = 2\n', "toml", "b.toml")
    assert info.value.line == 3
    assert str(info.value).startswith("b.toml:3: invalid TOML")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BackendsError, match="cannot read"):
        load_backends(tmp_path / "nope.yaml")


def test_load_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "b.yml"
    path.write_text("backends:\n  - url: http://a:1\n    state: off\n")
    with pytest.raises(BackendsError) as info:
        load_backends(path)
    assert str(info.value).startswith(f"{path}:3: backends[0].state: ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_bytes(b"backends: [\xff]\n")
    with pytest.raises(BackendsError, match="not UTF-8"):
        load_backends(path)


# --- diff ------------------------------------------------------------------------------------

def test_diff_backends() -> None:
    a = BackendSpec(url="http://a:1", name="a")
    b = BackendSpec(url="http://b:1", name="b")
    b2 = BackendSpec(url="http://b:1", name="b", state="draining")
    c = BackendSpec(url="http://c:1", name="c")
    assert diff_backends([a, b], [b2, c]) == ([c], [a], [b2])
    assert diff_backends([a, b], [b, a]) == ([], [], [])
    assert diff_backends([], [a]) == ([a], [], [])


# --- watcher ---------------------------------------------------------------------------------

def write(path: Path, text: str) -> None:
    """Write and move the mtime forward, so a rewrite within one clock tick is seen."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    st = path.stat()
    if st.st_mtime_ns <= old:
        os.utime(path, ns=(st.st_atime_ns, old + 1_000_000))


ONE = "backends:\n  - url: http://a:1\n"
TWO = "backends:\n  - url: http://a:1\n  - url: http://b:2\n    state: draining\n"


@pytest.fixture
def backends_file(tmp_path: Path) -> Path:
    path = tmp_path / "backends.yaml"
    write(path, ONE)
    return path


def test_watcher_initial_load_and_bad_start(backends_file: Path, tmp_path: Path) -> None:
    watcher = BackendsWatcher(backends_file, lambda specs: None)
    assert [s.name for s in watcher.current] == ["a:1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends: []\n")
    with pytest.raises(BackendsError):
        BackendsWatcher(bad, lambda specs: None)
    with pytest.raises(BackendsError, match="cannot read"):
        BackendsWatcher(tmp_path / "missing.yaml", lambda specs: None)


def test_watcher_applies_valid_change(backends_file: Path) -> None:
    seen: list[list[BackendSpec]] = []
    watcher = BackendsWatcher(backends_file, seen.append)
    assert watcher.check_now() is False
    write(backends_file, TWO)
    assert watcher.check_now() is True
    assert [[s.name for s in specs] for specs in seen] == [["a:1", "b:2"]]
    assert watcher.current[1].state == "draining"
    assert watcher.check_now() is False  # nothing new
    assert len(seen) == 1


def test_watcher_ignores_rewrite_with_same_meaning(backends_file: Path) -> None:
    seen: list[list[BackendSpec]] = []
    watcher = BackendsWatcher(backends_file, seen.append)
    write(backends_file, "# a comment\n" + ONE)
    assert watcher.check_now() is False
    assert seen == []


def test_watcher_keeps_last_good_on_invalid(backends_file: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    seen: list[list[BackendSpec]] = []
    watcher = BackendsWatcher(backends_file, seen.append)
    good = watcher.current
    write(backends_file, "backends:\n  - url: http://a:1\n    max_num_seqs: -3\n")
    with caplog.at_level(logging.WARNING, logger="blockproxy.backends"):
        assert watcher.check_now() is False
    assert watcher.current == good and seen == []
    records = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1
    assert "keeping the last good list" in records[0].getMessage()
    assert "backends[0].max_num_seqs" in records[0].getMessage()
    # The same bad file is not re-reported on every poll.
    caplog.clear()
    assert watcher.check_now() is False
    assert caplog.records == []
    # Fixing the file applies it.
    write(backends_file, TWO)
    assert watcher.check_now() is True
    assert len(seen) == 1


def test_watcher_survives_deletion(backends_file: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    seen: list[list[BackendSpec]] = []
    watcher = BackendsWatcher(backends_file, seen.append)
    backends_file.unlink()
    with caplog.at_level(logging.WARNING, logger="blockproxy.backends"):
        assert watcher.check_now() is False
        assert watcher.check_now() is False
    assert [r.getMessage() for r in caplog.records].count(
        f"backends file {backends_file} disappeared; keeping the last good list "
        "(1 instances)") == 1
    assert [s.name for s in watcher.current] == ["a:1"]
    write(backends_file, TWO)
    assert watcher.check_now() is True
    assert [s.name for s in seen[-1]] == ["a:1", "b:2"]


def test_watcher_sees_atomic_replace(backends_file: Path) -> None:
    seen: list[list[BackendSpec]] = []
    watcher = BackendsWatcher(backends_file, seen.append)
    tmp = backends_file.with_suffix(".tmp")
    tmp.write_text(TWO)
    os.replace(tmp, backends_file)
    assert watcher.check_now() is True


def test_watcher_uses_custom_logger(backends_file: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    watcher = BackendsWatcher(backends_file, lambda specs: None,
                              logger=logging.getLogger("custom.backends"))
    write(backends_file, "backends: []\n")
    with caplog.at_level(logging.WARNING, logger="custom.backends"):
        watcher.check_now()
    assert [r.name for r in caplog.records] == ["custom.backends"]


async def test_watcher_run_and_stop(backends_file: Path) -> None:
    applied = asyncio.Event()
    seen: list[list[BackendSpec]] = []

    def on_change(specs: list[BackendSpec]) -> None:
        seen.append(specs)
        applied.set()

    watcher = BackendsWatcher(backends_file, on_change, interval=0.01)
    task = asyncio.create_task(watcher.run())
    write(backends_file, TWO)
    await asyncio.wait_for(applied.wait(), timeout=10)
    watcher.stop()
    await asyncio.wait_for(task, timeout=10)
    assert [s.name for s in seen[0]] == ["a:1", "b:2"]


async def test_watcher_run_survives_failing_callback(backends_file: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    calls = asyncio.Event()

    def on_change(specs: list[BackendSpec]) -> None:
        calls.set()
        raise RuntimeError("boom")

    watcher = BackendsWatcher(backends_file, on_change, interval=0.01)
    task = asyncio.create_task(watcher.run())
    write(backends_file, TWO)
    await asyncio.wait_for(calls.wait(), timeout=10)
    watcher.stop()
    await asyncio.wait_for(task, timeout=10)
    assert any("cannot be applied, keeping the last good list" in r.getMessage()
               and "boom" in r.getMessage() for r in caplog.records)
    assert watcher.current == parse_backends(ONE, "yaml")
