"""Every option has one declaration and a domain: a value outside it is refused when the flags are parsed or the
config is made, with a message naming the option, never a traceback or a run that trains nothing."""
import argparse
import dataclasses
import re

import pytest

from parclip import cli
from parclip.attacks.patch_config import PatchConfig
from parclip.config import TrainConfig, make_config
from parclip.utils.checks import Domain, integers, numbers
from parclip.utils.flags import Arg, Fields, OneOf, Parsed, add_dataclass_arguments, arg, flag

MODEL = ["--model", "parclip-micro"]
EVAL = ["eval", *MODEL, "--data", "d"]
RETRIEVAL = ["eval-retrieval", *MODEL, "--data", "d.json"]
POISON = ["poison", "t.csv", "out", "--attack", "badnet_rs", "--target", "bag"]
PATCH = ["attack", "optimize-patch", *MODEL, "--data", "t.csv", "--target", "bag", "--out", "p.png"]

BAD_FLAGS = [  # (command line, the flag it must name, what it must say)
    (["train", "--batch-size", "0"], "--batch-size", "an int >= 1, got 0"),
    (["train", "--batch-size", "-8"], "--batch-size", "an int >= 1, got -8"),
    (["train", "--epochs", "0"], "--epochs", "an int >= 1, got 0"),
    (["train", "--tau", "9"], "--tau", "a number in [0, 4], got 9.0"),
    (["train", "--tau", "-0.5"], "--tau", "a number in [0, 4]"),
    (["train", "--accum-freq", "0"], "--accum-freq", "an int >= 1"),
    (["train", "--lr", "0"], "--lr", "a number > 0"),
    (["train", "--lr", "nan"], "--lr", "a number > 0, got nan"),
    (["train", "--beta2", "1"], "--beta2", "a number in [0, 1)"),
    (["train", "--workers", "-1"], "--workers", "an int >= 0"),
    (["train", "--max-bad-fraction", "1.5"], "--max-bad-fraction", "a number in [0, 1]"),
    (["train", "--train-num-samples", "0"], "--train-num-samples", "an int >= 1"),
    (["train", "--val-every", "-1"], "--val-every", "an int >= 0"),
    ([*POISON, "--n", "0"], "--n", "an int >= 1, got 0"),
    ([*POISON, "--rate", "0"], "--rate", "a number in (0, 1], got 0.0"),
    ([*POISON, "--rate", "1.5"], "--rate", "a number in (0, 1]"),
    ([*POISON, "--n", "5", "--jpeg-quality", "0"], "--jpeg-quality", "an int in [1, 100]"),
    ([*POISON, "--n", "5", "--image-size", "1"], "--image-size", "an int >= 2"),
    ([*POISON, "--n", "5", "--max-bad-fraction", "-0.1"], "--max-bad-fraction", "a number in [0, 1]"),
    ([*EVAL, "--batch-size", "0"], "--batch-size", "an int >= 1, got 0"),
    ([*EVAL, "--workers", "-2"], "--workers", "an int >= 0"),
    ([*EVAL, "--num_workers", "-2"], "--workers", "an int >= 0"),  # clip_benchmark's spelling
    ([*EVAL, "--recall_k", "5", "0"], "--recall_k", "an int >= 1, got 0"),
    ([*EVAL, "--max-bad-fraction", "2"], "--max-bad-fraction", "a number in [0, 1]"),
    ([*RETRIEVAL, "--asr-k", "0"], "--asr-k", "an int >= 1"),
    ([*RETRIEVAL, "--batch-size", "-1"], "--batch-size", "an int >= 1"),
    (["data", "fashion-mnist", "out", "--n-train", "0"], "--n-train", "an int >= 1"),
    (["data", "fashion-mnist", "out", "--n-test", "-3"], "--n-test", "an int >= 1"),
    (["data", "fashion-mnist", "out", "--holdout", "-1"], "--holdout", "an int >= 0"),
    (["data", "convert", "src", "out", "--maxcount", "0"], "--maxcount", "an int >= 1"),
    (["triggers", "show", "--size", "0"], "--size", "an int >= 2"),
    (["triggers", "show", "--zoom", "0"], "--zoom", "an int >= 1"),
    (["triggers", "show", "--dpi", "0"], "--dpi", "an int >= 1"),
    (["plot", "embeddings", *MODEL, "--data", "d", "--attack", "badnet_rs", "--per-class", "0"], "--per-class",
     "an int >= 1"),
    (["demo", "--tau", "5"], "--tau", "a number in [0, 4]"),
    ([*PATCH, "--batch-size", "0"], "--batch-size", "an int >= 1"),
    ([*PATCH, "--aug-prob", "1.5"], "--aug-prob", "a number in [0, 1]"),
]


@pytest.mark.parametrize("argv, option, says", BAD_FLAGS, ids=[" ".join(a[:2] + a[-2:]) for a, _, _ in BAD_FLAGS])
def test_a_flag_outside_its_domain_is_a_usage_error_naming_it(argv, option, says, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    # the flag as argparse names it: with its other spellings, if any (e.g. --batch-size/--batch_size)
    assert re.search(rf"argument {re.escape(option)}(/--[\w-]+)*: must be {re.escape(says)}", err), err


def test_values_inside_the_domain_parse_with_their_type():
    p = cli.build_parser()
    a = p.parse_args(["train", "--batch-size", "1", "--tau", "0", "--max-bad-fraction", "1", "--val-every", "0"])
    assert (a.batch_size, a.tau, a.max_bad_fraction, a.val_every) == (1, 0.0, 1.0, 0)
    assert isinstance(a.batch_size, int) and isinstance(a.tau, float)
    a = p.parse_args([*POISON, "--rate", "1", "--jpeg-quality", "100", "--image-size", "2"])
    assert (a.rate, a.jpeg_quality, a.image_size) == (1.0, 100, 2)
    a = p.parse_args([*EVAL, "--workers", "0", "--max-bad-fraction", "0"])
    assert (a.workers, a.max_bad_fraction, a.batch_size) == (0, 0.0, 256)


@pytest.mark.parametrize("values, option", [
    (dict(batch_size=0), "--batch-size must be an int >= 1, got 0"),
    (dict(epochs=0), "--epochs must be an int >= 1, got 0"),
    (dict(epochs=-2), "--epochs must be an int >= 1"),
    (dict(tau=9), r"--tau must be a number in \[0, 4\], got 9.0"),
    (dict(tau=-1e-3), r"--tau must be a number in \[0, 4\]"),
    (dict(accum_freq=0), "--accum-freq must be an int >= 1, got 0"),
    (dict(accum_freq=1.5), "option accum-freq: expected int, got 1.5"),
    (dict(par_weight=-1), "--par-weight must be a number >= 0"),
    (dict(lr=0), "--lr must be a number > 0"),
    (dict(lr_decay_ratio=-0.1), r"--lr-decay-ratio must be a number in \[0, 1\]"),
    (dict(lr_decay_ratio=2), r"--lr-decay-ratio must be a number in \[0, 1\]"),
    (dict(lr_start=1e-5), "--lr-start is not supported: removed; --lr is now the peak rate"),
    (dict(lr_end=-1), "--lr-end must be a number >= 0"),
    (dict(warmup=-1), "--warmup must be a number >= 0"),
    (dict(warmup=0.1), "a fraction of the run is now --warmup-fraction 0.1"),
    (dict(warmup_steps=-1), "--warmup must be a number >= 0"),
    (dict(warmup_fraction=1.5), r"--warmup-fraction must be a number in \[0, 1\]"),
    (dict(val_frequency=-1), "--val-frequency must be an int >= 0"),
    (dict(zeroshot_frequency=-1), "--zeroshot-frequency must be an int >= 0"),
    (dict(val_num_samples=0), "--val-num-samples must be an int >= 1"),
    (dict(train_rows=0), "--train-rows must be an int >= 1"),
    (dict(precision="fp16"), "--precision fp16 is not supported: open_clip's half-precision weights"),
    (dict(precision="pure_bf16"), "--precision pure_bf16 is not supported"),
    (dict(dataset_type="synthetic"), "--dataset-type synthetic is not supported: open_clip's random smoke-test"),
    (dict(schedule="const-cooldown"), "--schedule const-cooldown is not supported: the const-cooldown schedule"),
    (dict(report_to="mlflow"), "--report-to mlflow"),
    (dict(workers=-1), "--workers must be an int >= 0"),
    (dict(val_every=-1), "--val-every must be an int >= 0"),
    (dict(save_every=-1), "--save-every must be an int >= 0"),
    (dict(save_frequency=-1), "--save-frequency must be an int >= 0"),
    (dict(log_every=0), "--log-every must be an int >= 1"),
    (dict(max_bad_fraction=1.5), r"--max-bad-fraction must be a number in \[0, 1\]"),
    (dict(noise_sigma=-0.2), "--noise-sigma must be a number >= 0"),
    (dict(roclip_pool_size=0), "--roclip-pool-size must be an int >= 1"),
    (dict(roclip_every=0), "--roclip-every must be an int >= 1"),
    (dict(train_num_samples=0), "--train-num-samples must be an int >= 1"),
    (dict(shuffle_buffer=0), "--shuffle-buffer must be an int >= 1"),
    (dict(beta1=1.0), r"--beta1 must be a number in \[0, 1\)"),
    (dict(beta2=-0.1), r"--beta2 must be a number in \[0, 1\)"),
    (dict(eps=0), "--eps must be a number > 0"),
    (dict(wd=-1e-4), "--wd must be a number >= 0"),
    (dict(grad_clip=0), "--grad-clip must be a number > 0"),
    (dict(cleanclip_clip_weight=-1), "--cleanclip-clip-weight must be a number >= 0"),
    (dict(cleanclip_inmodal_weight=-1), "--cleanclip-inmodal-weight must be a number >= 0"),
    (dict(seed=-1), "--seed must be an int >= 0"),
    (dict(lr=float("inf")), "--lr must be a number > 0, got inf"),
    (dict(val_attack="badnet_rs", imagenet_val="val/"), "--val-attack needs --val-target"),
    (dict(val_attack="badnet_rs", val_target="bag"), "--val-attack / --val-every need --imagenet-val"),
    (dict(val_every=5), "--val-attack / --val-every need --imagenet-val"),
    (dict(val_every=5, val_data="pairs.csv"), "--val-attack / --val-every need --imagenet-val"),
])
def test_a_train_config_outside_its_domain_cannot_be_made(values, option):
    with pytest.raises(ValueError, match=option):
        make_config(**values)


def test_the_domain_bounds_themselves_are_accepted():
    cfg = make_config(tau=0, max_bad_fraction=1, val_every=0, workers=0, beta1=0, save_every=0, warmup=0,
                      lr_decay_ratio=0, warmup_fraction=1, grad_clip=None, train_num_samples=None, batch_size=1,
                      epochs=1, seed=0)
    assert (cfg.tau, cfg.max_bad_fraction, cfg.batch_size) == (0.0, 1.0, 1)
    assert make_config(tau=4, max_bad_fraction=0, val_every=3, imagenet_val="val/", val_attack="badnet_rs",
                       val_target="bag", lr_decay_ratio=1).tau == 4.0


def test_every_defence_recipe_and_preset_is_a_valid_config():
    from parclip.defences import PRESETS, list_defences

    for d in list_defences():
        assert make_config(objective=d.name).objective == d.name
    for name, preset in PRESETS.items():
        assert make_config(preset=name).objective == preset.objective


def test_a_yaml_value_outside_its_domain_is_an_error_naming_the_flag(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("epochs: 0\n")
    rc = cli.main(["train", "--config", str(tmp_path / "c.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "--epochs must be an int >= 1, got 0" in err and "Traceback" not in err
    rc = cli.main(["train", "--val-attack", "badnet_rs", "--imagenet-val", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--val-attack needs --val-target" in err


def test_a_patch_config_outside_its_domain_cannot_be_made():
    with pytest.raises(ValueError, match="--lr must be a number > 0, got 0"):
        PatchConfig(data="t.csv", target="bag", lr=0)
    with pytest.raises(ValueError, match="--seed must be an int >= 0"):
        PatchConfig(data="t.csv", target="bag", seed=-3)


# ------------------------------------------------------------------------------------------------- one declaration
def _actions(parser, path=()):
    """(command path, action) for every argument of every (sub)command."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, (*path, name))
        else:
            yield path, a


def _commands(commands=cli.COMMANDS, path=()):
    for c in commands:
        yield (*path, c.name), c
        yield from _commands(c.actions, (*path, c.name))


def _args(command):
    """Every Arg of a command, those inside mutually exclusive groups included."""
    for spec in command.specs():
        yield from (spec.args if isinstance(spec, OneOf) else [spec] if isinstance(spec, Arg) else [])


def test_max_bad_fraction_is_declared_once_for_every_command_that_has_it():
    declared = {path: a for path, c in _commands() for a in _args(c) if "--max-bad-fraction" in a.names}
    assert set(declared) == {("poison",), ("data", "check"), ("data", "convert"), ("eval",), ("eval-retrieval",)}
    assert all(a is cli.MAX_BAD_FRACTION for a in declared.values())
    # the generated flags of train and optimize-patch carry the same domain; every command has it
    having = {path: a for path, a in _actions(cli.build_parser()) if "--max-bad-fraction" in a.option_strings}
    assert set(having) == set(declared) | {("train",), ("attack", "optimize-patch")}
    assert {a.type.domain for a in having.values()} == {numbers(0, 1)}
    assert len({a.help for path, a in having.items() if path in declared}) == 1


def test_the_table_flags_of_eval_retrieval_are_the_table_commands_own():
    (retrieval,) = [c for path, c in _commands() if path == ("eval-retrieval",)]
    (check,) = [c for path, c in _commands() if path == ("data", "check")]
    shared = {id(a) for a in _args(retrieval)} & {id(a) for a in _args(check)}
    assert {id(cli.DATA_ROOT), id(cli.IMG_KEY), id(cli.CAPTION_KEY), id(cli.MAX_BAD_FRACTION)} <= shared


def test_no_argument_is_declared_twice():
    """Two separate declarations with the same names, options and domain are one argument written twice."""
    seen = {}
    for path, c in _commands():
        for a in _args(c):
            for other in seen.get(a.names, []):
                assert other is a or other != a, f"{a.names} of {' '.join(path)} is declared twice, identically"
            seen.setdefault(a.names, []).append(a)


def _leaf_parsers(parser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for a in subs:
        for name, sub in a.choices.items():
            yield from _leaf_parsers(sub, (*path, name))


def test_build_parser_is_short_and_routes_every_command_to_its_handler():
    import inspect

    assert len(inspect.getsource(cli.build_parser).splitlines()) < 20
    handlers = {path: c.run for path, c in _commands() if not c.actions}
    assert all(handlers.values())
    leaves = dict(_leaf_parsers(cli.build_parser()))
    assert set(leaves) == set(handlers)
    for path, parser in leaves.items():
        assert parser.get_default("handler") is handlers[path], path


# ------------------------------------------------------------------------------------------------- every number checked
def test_every_numeric_option_of_every_command_has_a_domain():
    numeric = []
    for path, a in _actions(cli.build_parser()):
        where = f"parclip {' '.join(path)} {'/'.join(a.option_strings) or a.dest}"
        assert a.type not in (int, float), f"{where} is a number without a domain"
        if isinstance(a.type, Parsed):
            assert isinstance(a.type.domain, Domain), where
            numeric.append(where)
        elif a.type is None and a.nargs is None and isinstance(a.default, (int, float)) \
                and not isinstance(a.default, bool) and not isinstance(a, argparse._StoreConstAction):
            pytest.fail(f"{where} has a numeric default but is parsed as text")
    assert len(numeric) > 50  # train's and optimize-patch's generated flags are walked too


def test_every_numeric_config_field_has_a_domain():
    from typing import get_type_hints

    for cls in (TrainConfig, PatchConfig):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if {int, float} & set(getattr(hints[f.name], "__args__", None) or (hints[f.name],)):
                assert isinstance(f.metadata.get("domain"), Domain), f"{cls.__name__}.{f.name}"


def test_a_numeric_option_without_a_domain_cannot_be_declared():
    with pytest.raises(TypeError, match="--count.*needs a domain"):
        arg("--count", type=int, default=3)

    @dataclasses.dataclass
    class Cfg:
        n: int = flag(3, "a count")

    with pytest.raises(TypeError, match="Cfg.n.*needs a domain"):
        add_dataclass_arguments(argparse.ArgumentParser(), Cfg)
    assert Fields is not None  # the spec for a dataclass's flags goes through the same check


def test_domains_check_through_the_one_validator():
    assert str(integers(1)) == "an int >= 1" and str(numbers(0, 1, hi_open=True)) == "a number in [0, 1)"
    assert numbers(0, lo_open=True).check("--lr", 1e-9) == 1e-9
    with pytest.raises(ValueError, match="--lr must be a number > 0, got 0"):
        numbers(0, lo_open=True).check("--lr", 0)
    with pytest.raises(ValueError, match="--n must be an int >= 1, got True"):
        integers(1).check("--n", True)  # a bool is not a count
