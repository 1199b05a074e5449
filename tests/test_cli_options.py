"""Shared command-line options read the same in every command, and a bad one is one clear error line."""

import pytest

from dmpo_edge.cli import COMMANDS, build_parser, main


def _actions(command):
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices[command]._actions}


def _with(option):
    return [c for c in COMMANDS if option in _actions(c)]


def test_backend_is_one_option_with_one_default():
    commands = _with("backend")
    assert set(commands) >= {"eval", "calibrate", "run", "bench", "demo"}, commands
    for c in commands:
        a = _actions(c)["backend"]
        assert a.default == "auto", (c, a.default)
        assert a.choices is None, c  # checked at run time: one "dmpo-edge: error:" line, not argparse's usage dump
    # one help text (run adds the null backend to it)
    helps = {_actions(c)["backend"].help.split(";")[0] for c in commands}
    assert len(helps) == 1, helps


@pytest.mark.parametrize("option", ["quiet", "bundle", "allow_pickle", "workspace_mib", "frontend", "buckets"])
def test_shared_option_is_defined_once(option):
    commands = [c for c in _with(option) if not (option == "buckets" and c == "bench")]  # bench pads stage batches
    assert len(commands) >= 2, (option, commands)
    kinds = {(type(_actions(c)[option]).__name__, _actions(c)[option].default, _actions(c)[option].metavar)
             for c in commands}
    assert len(kinds) == 1, (option, kinds)


def test_json_means_a_file_or_a_switch_by_command():
    as_file = {c for c in _with("json") if _actions(c)["json"].metavar == "OUT"}
    as_switch = {c for c in _with("json") if _actions(c)["json"].nargs == 0}
    assert as_file == {"bench", "calibrate", "eval"}, as_file
    assert as_switch == {"run", "inspect"}, as_switch


def _one_error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("dmpo-edge: error:")]
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    return lines[0]


@pytest.mark.parametrize("command,extra", [
    ("run", ["--source", "frames/"]),
    ("eval", ["--data", "digits:test"]),
    ("calibrate", ["--val", "digits:val", "--max-drop", "0.01"]),
])
def test_unknown_backend_is_one_clear_error(capsys, toy_bundle, command, extra):
    line = _one_error_line(capsys, [command, toy_bundle().path, "--backend", "tpu"] + extra)
    assert "unknown backend 'tpu'" in line and "Expected one of auto, ort, trt" in line, line


def test_null_backend_only_where_its_output_means_something(capsys, toy_bundle):
    line = _one_error_line(capsys, ["eval", toy_bundle().path, "--data", "digits:test", "--backend", "null"])
    assert "unknown backend 'null'" in line, line
    assert "null" in _actions("run")["backend"].metavar


@pytest.mark.parametrize("command", ["run", "bench"])
def test_batches_in_flight_take_both_spellings(command):
    for flag in ("--in-flight", "--max-in-flight"):
        argv = [command, "B", flag, "3"] + (["--source", "frames/"] if command == "run" else [])
        assert build_parser(command).parse_args(argv).max_in_flight == 3
    assert _actions(command)["max_in_flight"].default == 2
