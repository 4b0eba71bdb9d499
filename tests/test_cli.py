"""The command line as a whole: every verb walked, one meaning per flag name, --help defaults read from
the config dataclasses, --config/--set wherever a verb builds a config."""
from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from pmmcache.cache import read_manifest
from pmmcache.cli import ConfigOption, build_config, config_default, default_text, main
from pmmcache.data.prepare import PrepareConfig
from pmmcache.errors import ConfigError

from helpers.toy import IMAGE_SIZE, K, NAME, TEXT_TOKENS

# Flags whose help may differ between verbs: the meaning is the same, the verb's own thing of that kind.
PER_VERB = {
    "--dataset": "the dataset(s) the verb reads; train adds how several combine, eval that it may differ from the run's",
    "--batch-size": "the verb's batch: items per encoder batch (extract, add-items), users (train, bench step)",
    "--modalities": "the item modalities the verb works on: extracted (extract) or modelled (train)",
    "--output": "the file the verb writes its result to",
    "--runs-dir": "the root of run directories; pipeline's holds one folder per recipe",
    "--force": "redo an artifact made with other settings: a cache (extract), finished runs (pipeline run)",
    "--set": "override a setting of the verb's own config: a stage config, or a recipe (pipeline)",
    "--users": "the verb's users: the dataset's users file (prepare, extract, train), or how many (bench eval)",
    "--images": "the images of the items the verb reads: the dataset's (prepare, extract, train), the new ones (add-items)",
    "--run": "the run directory the verb reads (eval, recommend, ...) or writes (import-checkpoint)",
    "--precision": "the verb's compute precision: eval's autocast on CUDA, bench's (auto = as the real command runs)",
}


def commands(group: click.Group = main, prefix: str = "") -> dict[str, click.Command]:
    """Every verb, by its full name ('bench step')."""
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found.update(commands(command, f"{prefix}{name} "))
        else:
            found[prefix + name] = command
    return found


def options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]


def meaning(option: click.Option) -> str:
    """The help text without the default, the part that says what the flag is."""
    return re.sub(r"\s*\[default: [^\]]*\]", "", option.help or "").strip()


def shown_default(command: click.Command, option: click.Option) -> str | None:
    """The default that `--help` prints for the option (`[default: ...]`), or None."""
    with click.Context(command, info_name="pmmcache") as ctx:
        record = option.get_help_record(ctx)
        default = option.get_help_extra(ctx).get("default")
    assert default is None or f"[default: {default}" in record[1]
    return default


def test_every_flag_name_has_one_meaning_across_verbs():
    seen: dict[str, dict[str, str]] = {}  # flag -> meaning -> first verb
    for verb, command in commands().items():
        for option in options(command):
            for flag in option.opts + option.secondary_opts:
                seen.setdefault(flag, {}).setdefault(meaning(option), verb)
    conflicts = {flag: meanings for flag, meanings in seen.items() if len(meanings) > 1 and flag not in PER_VERB}
    assert conflicts == {}
    # The two that had two meanings: -k (top blocks vs top-k) and --seed (encoder init vs training).
    assert all("--top-blocks" in option.opts for command in commands().values() for option in options(command)
               if "-k" in option.opts)
    assert "--seed" not in [f for option in options(commands()["extract"]) for f in option.opts]


def test_help_defaults_are_the_config_dataclass_defaults():
    checked = 0
    for verb, command in commands().items():
        for option in options(command):
            assert "[default:" not in (option.help or "") or not isinstance(option, ConfigOption), \
                f"{verb} {option.opts[0]}: a hand-written default beside the config's"
            if not isinstance(option, ConfigOption):
                continue
            value = config_default(option.config, option.field)
            want = option.none_means if value is None else default_text(value)
            assert shown_default(command, option) == (want or None), f"{verb} {option.opts[0]}"
            checked += 1
    assert checked > 50
    train = {option.opts[-1]: option for option in options(commands()["train"])}
    assert shown_default(commands()["train"], train["--lr"]) == "0.0001"
    assert shown_default(commands()["train"], train["--top-blocks"]) == "2"  # TrainConfig.encoders.top_blocks
    assert shown_default(commands()["extract"], dict((o.opts[-1], o) for o in options(commands()["extract"]))
                         ["--modalities"]) == "text,image"


def test_every_verb_that_builds_a_config_takes_config_and_set():
    for verb, command in commands().items():
        flags = {flag for option in options(command) for flag in option.opts}
        if any(isinstance(option, ConfigOption) for option in options(command)) and not verb.startswith("bench"):
            assert {"--config", "--set"} <= flags, verb
    for verb in ("extract", "train", "prepare", "recommend", "add-items", "export-items", "demo"):
        assert {"--config", "--set"} <= {f for option in options(commands()[verb]) for f in option.opts}, verb
    for verb in ("extract", "add-items", "bench step", "bench eval", "bench extract"):
        assert "--device" in {f for option in options(commands()[verb]) for f in option.opts}, verb


def test_help_of_every_verb_renders():
    runner = CliRunner()
    for verb in commands():
        result = runner.invoke(main, [*verb.split(), "--help"])
        assert result.exit_code == 0, (verb, result.output)


def test_a_config_file_sets_what_the_options_leave_and_set_overrides_both(tmp_path):
    """Config = defaults < file < options given < --set; an unknown key names itself."""
    config = tmp_path / "prepare.yaml"
    config.write_text("min_core: 3\nmax_history: 7\n")
    built = build_config(PrepareConfig, str(config), {"min_core": None, "max_history": 9, "truncate": None},
                         ("truncate=true",))
    assert (built.min_core, built.max_history, built.truncate) == (3, 9, True)
    with pytest.raises(ConfigError, match="unknown setting.*'min_cores'"):
        build_config(PrepareConfig, str(config), {}, ("min_cores=2",))


def test_recommend_takes_top_not_k(tmp_path):
    result = CliRunner().invoke(main, ["recommend", "--run", str(tmp_path), "--history", "a", "-k", "3"])
    assert result.exit_code == 2 and "No such option '-k'" in result.output
    top = {option.opts[-1]: option for option in options(commands()["recommend"])}["--top"]
    assert "-n" in top.opts and shown_default(commands()["recommend"], top) == "10"


def test_extract_encoder_seed_is_the_seed_of_the_vision_init(toy, tmp_path):
    """`extract --encoder-seed 1` sets ExtractConfig.encoders.seed, the key config files and recipes use: the cache
    says so in its manifest and in its name."""
    args = ["extract", "--dataset", NAME, "--data-dir", str(toy.data_dir), "--cache-dir", str(tmp_path),
            "--text-encoder", str(toy.bert_dir), "--vision-encoder", "pmmcache-tiny-vit", "--vision-weights", "random",
            "-k", str(K), "--max-text-length", str(TEXT_TOKENS), "--image-size", str(IMAGE_SIZE),
            "--num-workers", "0", "--device", "cpu", "--encoder-seed", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / NAME).glob("*.h5")
    assert path.stem.endswith(f"-{IMAGE_SIZE}-seed1") and read_manifest(path)["extract"]["encoders"]["seed"] == 1
