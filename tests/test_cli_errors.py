"""`kunlun` fails with one clear line and the right status, never a traceback: usage, validation, closed pipes,
Ctrl-C, damaged checkpoints; and Llama baseline checkpoints (`kunlun train --arch llama`) work with
`generate` and `export --hf`."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kunlunbaize
from kunlunbaize.checkpoint import CheckpointError, checkpoint_arch, resolve_checkpoint
from kunlunbaize.cli import main
from kunlunbaize.infer import SamplingParams
from kunlunbaize.infer.load import load_model

SRC = str(Path(kunlunbaize.__file__).resolve().parents[1])


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``kunlun ARGS`` in-process: exit status, stdout, stderr."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def kunlun(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.Popen([sys.executable, "-m", "kunlunbaize.cli", *args], env=env, **kw)


# --- usage ---------------------------------------------------------------------------------------------------

def test_bare_kunlun_prints_help_and_version_exists(capsys):
    code, out, err = run_main(capsys)
    assert code == 2 and "usage: kunlun" in out and "generate" in out and "error" not in err
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"kunlun (kunlunbaize) {kunlunbaize.__version__}"


@pytest.mark.parametrize("args", [
    ["generate", "x", "--temperature", "nan"], ["generate", "x", "--temperature", "inf"],
    ["generate", "x", "--temperature", "-1"], ["generate", "x", "--top-p", "0"], ["generate", "x", "--top-p", "-0.5"],
    ["generate", "x", "--top-p", "1.5"], ["generate", "x", "--top-p", "nan"], ["generate", "x", "--top-k", "-1"],
    ["generate", "x", "--max-new-tokens", "0"], ["generate", "x", "--max-new-tokens", "-1"],
    ["generate", "x", "--draft-len", "0"], ["info", "--seq-len", "-5"], ["info", "--seq-len", "0"],
    ["demo", "--steps", "0"], ["demo", "--steps", "-1"], ["demo", "--batch-size", "0"], ["demo", "--seq-len", "1"],
    ["demo", "--lr", "0"], ["demo", "--lr", "nan"], ["demo", "--max-new-tokens", "0"], ["info", "--bogus"],
    ["generate", "x", "--seed", "99999999999999999999999"], ["demo", "--seed", "-1"],
])
def test_numeric_arguments_are_validated(capsys, args):
    code, out, err = run_main(capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kunlun {args[0]}: ") and f"kunlun {args[0]} --help" in lines[0]


def test_sampling_params_refuse_non_finite_values():
    for kw in (dict(temperature=math.nan), dict(temperature=math.inf), dict(top_p=math.nan), dict(top_p=-0.1)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


@pytest.mark.parametrize("args, names", [
    (["info", "--set", "n_layers=0"], "--set: invalid config: ModelConfig.n_layers"),
    (["info", "--set", "oops"], "argument --set: 'oops' must look like key=value"),
    (["info", "--set", "no_such_field=1"], "--set: invalid config: ModelConfig has no field 'no_such_field'"),
    (["demo", "--set", "dense_residual=maybe"], "--set: invalid config: ModelConfig.dense_residual"),
    (["demo", "--prompt", ""], "--prompt is empty"),
    (["demo", "--seq-len", "100000"], "--seq-len 100000: must be between 2 and the preset's max_seq_len"),
    (["train", "--tokens", "-5"], "argument --tokens: expected an integer >= 1, got -5"),
    (["train", "--lr", "0"], "argument --lr: expected a finite number > 0"),
    (["train", "--seq-len", "1"], "argument --seq-len: expected an integer >= 2"),
    (["train", "--keep-last", "-1"], "argument --keep-last"),
    (["train", "--set", "n_heads=0"], "--set: invalid config: ModelConfig.n_heads"),
    (["train", "--batch-size", "4", "--batch-size-start", "8"], "--batch-size-start = 8 is invalid"),
    (["train", "--rope", "yarn"], "--rope = 'yarn' is invalid: it must be left out without init_from"),
    (["train", "--rope-factor", "1"], "argument --rope-factor: expected a finite number > 1"),
    (["train", "--init-from", "no/such/run"], "--init-from: no checkpoint at no/such/run"),
    (["eval", "--task", "nope"], "argument --task: unknown task 'nope'"),
    (["eval", "--task", "mc"], "argument --task: mc needs a file"),
    (["eval", "--task", "nolayout=x.jsonl"], "argument --task: nolayout=x.jsonl: 'nolayout' is neither"),
    (["eval", "--task", "arith", "--include-path", "x"], "--include-path applies to --lm-eval tasks"),
    (["eval", "--device", "tpu"], "unknown --device 'tpu'"),
    (["ablate", "--dry-run", "--variants", "full,nope"], "argument --variants: unknown variant 'nope'"),
    (["ablate", "--dry-run", "--seeds", "0,x"], "argument --seeds: '0,x': give integers"),
    (["ablate", "--dry-run", "--set", "d_model=-1"], "--set: invalid config: ModelConfig.d_model"),
    (["ablate", "--dry-run", "--lr", "0"], "argument --lr"),
    (["prepare", "--val-fraction", "0.9"], "argument --val-fraction: expected a finite number in [0, 0.5]"),
    (["prepare", "--min-chars", "10", "--max-chars", "5"], "--max-chars 5 must be >= --min-chars 10"),
    (["reward", "x.jsonl", "--rewards", "nope"], "argument --rewards: unknown reward 'nope'"),
    (["reward", "x.jsonl", "--rewards", "math", "--max-chars", "0"], "argument --max-chars"),
    (["reward", "x.jsonl", "--rewards", "math", "--reward-model", "m"], "--rewards does not name it"),
    (["posttrain", "sft", "--tasks", "poems:5"], "argument --tasks: 'poems:5': unknown task kind 'poems'"),
    (["posttrain", "rs", "--tasks", "math:x"], "argument --tasks: expected an integer, got 'x'"),
    (["posttrain", "rs", "--rewards", "math", "--reward-model", "m"], "--rewards does not name it"),
    (["serve", "--device", "nope"], "unknown --device 'nope'"),
])
@pytest.mark.slow
def test_invalid_values_found_after_parsing_are_usage_errors(capsys, args, names):
    """Every wrong argument value is a usage error (exit 2): one line that names the option and the command."""
    code, out, err = run_main(capsys, *args)
    command = " ".join(args[:2]) if args[0] == "posttrain" else args[0]
    assert code == 2 and out == "", (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], err
    assert lines[0].startswith(f"kunlun {command}: ") and lines[0].endswith(f"see `kunlun {command} --help`")


def test_train_defaults_shown_in_help_are_the_runs(capsys):
    """`kunlun train --help` shows TrainConfig's defaults (kept in the torch-free kunlunbaize.defaults)."""
    from kunlunbaize.defaults import DEFAULT_DATA, TRAIN
    from kunlunbaize.train.trainer import DEFAULT_DATA as TRAINER_DATA
    from kunlunbaize.train.trainer import TrainConfig

    assert {k: getattr(TrainConfig(), k) for k in TRAIN} == TRAIN and DEFAULT_DATA == TRAINER_DATA
    code, out, _ = run_main(capsys, "train", "--help")
    assert code == 0 and f"default {TrainConfig().tokens:,}" in out and f"default {TrainConfig().lr}" in out


@pytest.mark.slow
@pytest.mark.subprocess
def test_parser_and_help_import_no_torch():
    """Building the parser, parsing every command and `kunlun --help` / `--version` / `kunlun CMD --help` load no
    torch, transformers, tokenizers or numpy (the commands import them when they run)."""
    heavy = ("torch", "transformers", "tokenizers", "numpy", "datasets", "trl", "safetensors", "uvicorn", "datatrove",
             "spacy", "lingua")
    check = (f"import sys; heavy = [m for m in sys.modules if m.split('.')[0] in {heavy!r}]; "
             "assert not heavy, heavy")
    required = {"reward": ["x", "--rewards", "math"], "posttrain": ["sft"], "export": ["--hf", "x"],
                "curate": ["x", "--out", "y"]}
    parse = ("from kunlunbaize.cli import build_parser; from kunlunbaize.cli.main import COMMANDS; "
             f"p = build_parser(); [p.parse_args([c, *{required!r}.get(c, [])]) for c in COMMANDS]; {check}")
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-c", parse], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for args in (["--help"], ["--version"], ["train", "--help"], ["posttrain", "dpo", "--help"], ["eval", "--help"]):
        code = f"from kunlunbaize.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n{check}"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (args, r.stderr)
        assert "usage: kunlun" in r.stdout or "kunlun (kunlunbaize)" in r.stdout, (args, r.stdout)


def test_library_packages_never_import_the_command_line():
    """The layers point one way: no module outside kunlunbaize.cli imports it (not even inside a function)."""
    package = Path(SRC) / "kunlunbaize"
    for path in package.rglob("*.py"):
        if path.parent.name == "cli" and path.parent.parent == package:
            continue
        text = path.read_text(encoding="utf-8")
        assert "from ..cli" not in text and "from .cli" not in text and "kunlunbaize.cli" not in text, path


# --- generate: checks before anything is printed ---------------------------------------------------------------

def test_generate_checks_come_before_the_echo(trained_run, tmp_path, capsys):
    run = str(trained_run)
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("def ")
    usage = [  # exit 2, one line naming the option
        (["x", "--prompt-file", str(prompt_file)], "both as an argument and with --prompt-file"),
        (["x", "--device", "tpu"], "unknown --device 'tpu'"),
        (["x", "--draft-len", "1"], "--adaptive and --draft-vocab apply to --speculative"),
        (["x", "y", "--speculative"], "one prompt at a time"),
    ]
    if not torch.cuda.is_available():
        usage.append((["x", "--device", "cuda"], "no CUDA GPU"))
    failures = [  # exit 1: what the checkpoint cannot do
        (["word " * 200, "--max-new-tokens", "8"], "fit the context"),
        (["x", "--speculative", "--draft-vocab", "9999999"], "exceeds the vocabulary"),
        (["x", "--speculative", "--draft-len", "9"], "exceeds the model's mtp_depth=2"),
    ]
    for status, cases in ((2, usage), (1, failures)):
        for args, message in cases:
            code, out, err = run_main(capsys, "generate", *args, "--checkpoint", run)
            assert code == status and out == "" and message in err, (args, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_max_new_tokens_is_clipped_to_the_context(trained_run, capsys):
    code, out, err = run_main(capsys, "generate", "def ", "--checkpoint", str(trained_run), "--max-new-tokens", "400")
    assert code == 0 and out.startswith("def ")
    assert "--max-new-tokens 400 clipped to" in err and "[finished: length]" in err
    code, out, err = run_main(capsys, "generate", "word " * 200, "--checkpoint", str(trained_run),
                              "--max-new-tokens", "400", "--truncate")
    assert code == 0 and "truncated to its last 32 of" in err and "clipped to 32" in err  # context 64: half each


def test_damaged_config_and_tokenizer_are_named(trained_run, tmp_path, capsys):
    ckpt = resolve_checkpoint(trained_run)
    for name in ("config.json", "tokenizer.json"):
        bad = tmp_path / name
        shutil.copytree(ckpt, bad)
        (bad / name).write_text((ckpt / name).read_text()[:40])
        code, out, err = run_main(capsys, "generate", "x", "--checkpoint", str(bad))
        assert code == 1 and out == "" and f"{bad / name} is unreadable or truncated" in err, err


def test_ctrl_c_in_generate_keeps_the_streamed_text(trained_run, capsys, monkeypatch):
    from kunlunbaize.infer.text import TextStream

    args = ["generate", "def ", "--checkpoint", str(trained_run), "--stop", "\x00\x00\x00\x00"]
    code, full, _ = run_main(capsys, *args, "--max-new-tokens", "6")
    assert code == 0
    update, calls = TextStream.update, []

    def interrupted(self, row, tokens, final=False):
        calls.append(1)
        if len(calls) > 6:
            raise KeyboardInterrupt
        return update(self, row, tokens, final)

    monkeypatch.setattr(TextStream, "update", interrupted)
    code, out, err = run_main(capsys, *args, "--max-new-tokens", "40")
    assert code == 130 and "kunlun generate: interrupted" in err and "Traceback" not in err
    assert out == full  # the 6 tokens streamed, held-back text included, and the final newline


# --- process boundary: closed pipes and Ctrl-C ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.subprocess
def test_closed_stdout_stops_nothing(trained_run, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def f(x):\n    return x + 1\n" * 50)
    out = tmp_path / "ds"
    # info on the tiny preset: the paper preset's meta build costs seconds and prints the same lines
    commands = [["info", "--preset", "tiny"],
                ["generate", "def ", "--checkpoint", str(trained_run), "--max-new-tokens", "20"],
                ["prepare", str(src), "--out", str(out), "--vocab-size", "300", "--workers", "1"]]
    for args in commands:
        p = kunlun(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()  # the reader is gone before the first line (`| head -0`)
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == 0, (args, err)
        assert "Traceback" not in err and "BrokenPipe" not in err, (args, err)
    assert (out / "meta.json").is_file()  # the dataset was built all the same


@pytest.mark.subprocess
def test_ctrl_c_during_startup_imports_exits_130(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    # a finder announces the moment main() starts importing torch and holds it there, so the interrupt lands
    # inside that import however fast the machine is
    code = ("import sys, time, kunlunbaize.cli as c; assert 'torch' not in sys.modules\n"
            "class Hold:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch':\n"
            "            print('importing torch', flush=True); time.sleep(30)\n"
            "        return None\n"
            "sys.meta_path.insert(0, Hold())\n"
            "c.main(['info', '--preset', 'tiny'])")
    # a shell running this suite in the background hands it SIGINT ignored, and Python then keeps ignoring it:
    # the child starts with the default disposition, as from a terminal
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline().strip() == b"importing torch"  # inside main(), torch not yet imported
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err.decode()
    assert err.decode().strip() == "kunlun info: interrupted (Ctrl-C)"


# --- Llama baseline checkpoints ------------------------------------------------------------------------------------

def test_llama_checkpoint_says_what_it_is(llama_run):
    ckpt = resolve_checkpoint(llama_run)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["arch"] == "llama" and cfg["llama_config"]["model_type"] == "llama"
    assert checkpoint_arch(ckpt).name == "llama"
    with pytest.raises(CheckpointError, match="Llama baseline checkpoint"):
        load_model(ckpt)


def test_generate_from_a_llama_checkpoint(llama_run, tmp_path, capsys):
    code, first, err = run_main(capsys, "generate", "def ", "--checkpoint", str(llama_run), "--max-new-tokens", "6")
    assert code == 0 and first.startswith("def ") and "[finished:" in err
    code, out, err = run_main(capsys, "generate", "def ", "--checkpoint", str(llama_run), "--speculative")
    assert code == 1 and out == "" and "Llama baseline checkpoint" in err and "drop --speculative" in err
    # written before checkpoints recorded their architecture: recognised by the weight names
    old = tmp_path / "old"
    shutil.copytree(resolve_checkpoint(llama_run), old)
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k not in ("arch", "llama_config")}))
    (old / "trainer_state.json").write_text(json.dumps({"step": 4, "consumed_samples": 32, "tokens": 1024}))
    assert checkpoint_arch(old).name == "llama"
    code, again, err = run_main(capsys, "generate", "def ", "--checkpoint", str(old), "--max-new-tokens", "6")
    assert code == 0 and again == first, err


def test_generate_llama_is_exact():
    transformers = pytest.importorskip("transformers")
    from kunlunbaize.infer.llama import generate_llama

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    prompts = [torch.randint(1, 53, (n,)).tolist() for n in (7, 2, 4)]
    for p in prompts:
        ids = list(p)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert generate_llama(model, [p], 12).tokens[0] == ids[len(p):]
    batch = generate_llama(model, prompts, 12, eos_id=0)
    assert batch.tokens == [generate_llama(model, [p], 12, eos_id=0).tokens[0] for p in prompts]
    assert len(generate_llama(model, [[1] * 30], 100).tokens[0]) == 10  # clipped to the context of 40


def test_export_llama_checkpoint(llama_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from kunlunbaize.infer.llama import load_llama

    out = tmp_path / "hf"
    code, _, err = run_main(capsys, "export", "--hf", str(out), "--checkpoint", str(llama_run))
    assert code == 0 and "reloaded logits identical" in err, err
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    mask = os.umask(0)
    os.umask(mask)  # every file readable as the umask says (safetensors alone would write 0600)
    assert {p.name for p in out.iterdir() if p.stat().st_mode & 0o777 != 0o666 & ~mask} == set()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.padding_side == "left" and tok.model_max_length == hf.config.max_position_embeddings
    ours, _ = load_llama(llama_run)
    ids = torch.tensor([tok("def f(x):")["input_ids"]])
    assert torch.equal(hf(ids).logits, ours(ids).logits)
    code, _, err = run_main(capsys, "generate", "def ", "--checkpoint", str(out), "--max-new-tokens", "4")
    assert code == 0, err  # `kunlun generate` reads the export too
    code, _, err = run_main(capsys, "export", "--hf", str(llama_run), "--checkpoint", str(llama_run), "--overwrite")
    assert code == 1 and "would be replaced" in err and resolve_checkpoint(llama_run).is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_main(capsys, "export", "--hf", str(blocker / "sub"), "--checkpoint", str(llama_run))
    assert code == 1 and err.startswith(f"kunlun export: cannot write {blocker / 'sub'}"), err


def test_prepare_into_an_unwritable_folder_is_one_line(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text to prepare\n" * 50)
    (tmp_path / "afile").write_text("not a folder")
    code, _, err = run_main(capsys, "prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "afile" / "ds"),
                            "--workers", "1")
    assert code == 1 and err.strip().splitlines()[-1].startswith("kunlun prepare: error: cannot write"), err
    assert "Traceback" not in err and not list(tmp_path.glob("afile*.tmp-*"))


def test_sample_after_training_a_llama_baseline(llama_run, dataset, capsys):
    """The sample `kunlun train` prints works for a Llama baseline run too (plain decoding, corpus prompt)."""
    from kunlunbaize.infer.sample import print_sample

    print_sample(llama_run, None, dataset, 5)
    out = capsys.readouterr().out
    assert "seed 0; plain decoding, Llama baseline):" in out and len(out.strip().splitlines()) >= 3, out
