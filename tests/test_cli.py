"""The `ppl` command driven as a user drives it: `python -m ppl ...` in a subprocess.

Each test writes its own files into a temporary directory, runs the command there with
`PYTHONPATH` set to the worktree, and checks the exit status, the output against the independent
float64 reference of tests/reference.py, and that errors are one line with no traceback. Start-up
with torch and JAX costs seconds, so the expensive runs are shared by module-scoped fixtures.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.reference import reference_perplexity

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"numpy", "torch", "jax", "jax-x64"}

# A wrapper that hides optional packages from the command, as on a machine without them.
_WITHOUT = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None
sys.meta_path.insert(0, Blocker())
from ppl.__main__ import main
code = main(sys.argv[1:])
leaked = sorted(BLOCKED & {{name.split(".")[0] for name in sys.modules}})
assert not leaked, leaked
sys.exit(code)
"""


class Payload:
    """An arbitrary Python object, which weights-only loading must refuse to unpickle."""


def run_ppl(*args, cwd, without=(), timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("JAX_ENABLE_X64", None)
    if without:
        command = [sys.executable, "-c", _WITHOUT.format(blocked=set(without)), *args]
    else:
        command = [sys.executable, "-m", "ppl", *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ppl: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def relative(a, b):
    return abs(a - b) / abs(b)


def _cases_with_references():
    from ppl._cases import embedded_cases

    references = {}
    for case in embedded_cases():
        values = np.concatenate([batch.values for batch in case.batches])
        masks = [batch.mask for batch in case.batches]
        mask = None if masks[0] is None else np.concatenate(masks)
        references[case.name] = reference_perplexity(mask=mask, **{case.kind: values})
    return references


@pytest.fixture(scope="module")
def cases_references():
    return _cases_with_references()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def default_run(workdir):
    return run_ppl(cwd=workdir)


@pytest.fixture(scope="module")
def parity_json(workdir):
    result = run_ppl("parity", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- ppl parity on the embedded cases ---------------------------------------------------------


def test_no_arguments_prints_the_parity_table(default_run, cases_references):
    assert default_run.returncode == 0, default_run.stderr
    assert default_run.stderr == ""
    out = default_run.stdout
    for case in cases_references:
        rows = [line for line in out.splitlines() if line.startswith(case + "  ")]
        assert {row[len(case) :].split()[0] for row in rows} == BACKENDS, case
    assert "bfloat16-rounded input" in out
    assert re.search(r"^PASS: largest relative difference \S+ <= rtol 1e-05$", out, re.M)


def test_parity_values_match_the_independent_reference(parity_json, cases_references):
    document = parity_json
    assert document["command"] == "parity" and document["source"] == "embedded"
    assert document["passed"] is True and document["rtol"] == 1e-5
    assert {backend["name"] for backend in document["backends"]} == BACKENDS
    assert document["skipped"] == []
    results = document["results"]
    assert len(results) == len(cases_references) * len(BACKENDS)
    largest = 0.0
    for result in results:
        expected = cases_references[result["case"]]
        # The command's own reference agrees with the test suite's to float64 rounding.
        assert relative(result["reference"], expected) < 1e-12, result
        assert relative(result["value"], expected) < 1e-5, result
        assert result["rel_diff"] == pytest.approx(relative(result["value"], result["reference"]))
        assert result["passed"] is True and result["error"] is None
        assert isinstance(result["seconds"], float) and result["seconds"] >= 0
        largest = max(largest, result["rel_diff"])
    assert document["max_rel_diff"] == pytest.approx(largest)
    bf16 = [result for result in results if result["case"] == "bf16 logits"]
    assert {result["input_dtype"] for result in bf16} == {"bfloat16"}
    notes = [r["notes"] for r in results if r["backend"] == "jax" and r["input_dtype"] == "float64"]
    assert notes and all("float64 input computed as float32 (x64 off)" in n for n in notes)


def test_parity_exits_1_beyond_rtol(workdir):
    result = run_ppl("parity", "--backend", "numpy", "--rtol", "1e-12", "--json", cwd=workdir)
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert document["passed"] is False
    failed = [r for r in document["results"] if not r["passed"]]
    assert failed and all(r["rel_diff"] > 1e-12 for r in failed)
    assert all(r["rel_diff"] <= 1e-12 for r in document["results"] if r["passed"])

    text = run_ppl("--rtol", "1e-12", "--backend", "numpy", cwd=workdir)
    assert text.returncode == 1
    assert f"FAIL: {len(failed)} of {len(document['results'])} results exceed rtol 1e-12" in (
        text.stdout
    )


# --- ppl compute and ppl parity on files ------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_shards(workdir):
    """A directory of shards in every format and dtype, and the logits they hold, in order."""
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch_file

    rng = np.random.default_rng(11)
    directory = workdir / "mixed"
    directory.mkdir()
    parts = []

    logits = (3 * rng.standard_normal((2, 5, 40))).astype(np.float32)
    np.save(directory / "a_float32.npy", logits)
    parts.append(logits.reshape(-1, 40))

    logits = rng.standard_normal((7, 40)).astype(np.float16)
    np.savez(directory / "b_float16.npz", logits=logits, other=np.zeros(3))
    parts.append(logits.astype(np.float64))

    logits = torch.randn(3, 4, 40, generator=torch.Generator().manual_seed(0)) * 5
    logits = logits.to(torch.bfloat16)
    logits[0, 0, :30] = float("-inf")
    torch.save({"logits": logits, "step": torch.tensor(3)}, directory / "c_bfloat16.pt")
    parts.append(logits.double().numpy().reshape(-1, 40))

    logits = 10 * rng.standard_normal((6, 40))
    save_file({"logits": logits}, str(directory / "d_float64.safetensors"))
    parts.append(logits)

    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    save_torch_file({"logits": logits}, str(directory / "e_bfloat16.safetensors"))
    parts.append(logits.double().numpy())

    (directory / "notes.txt").write_text("not a shard")
    return directory, parts


def test_compute_streams_a_directory_of_every_format(workdir, mixed_shards):
    _, parts = mixed_shards
    result = run_ppl("compute", "mixed", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    expected = reference_perplexity(logits=np.concatenate(parts))
    assert relative(document["perplexity"], expected) < 1e-6
    assert document["num_distributions"] == sum(len(part) for part in parts)
    assert document["backend"] == "numpy" and document["input"] == "logits"
    assert document["num_files"] == 5
    names = [Path(entry["path"]).name for entry in document["files"]]
    assert names == sorted(names) and len(names) == 5
    assert [entry["num_distributions"] for entry in document["files"]] == [len(p) for p in parts]
    assert [entry["dtype"] for entry in document["files"]] == [
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "bfloat16",
    ]
    assert document["files"][0]["shape"] == [2, 5, 40]
    assert document["files"][1]["key"] == "logits"


def test_parity_on_files_runs_every_backend(workdir, mixed_shards):
    _, parts = mixed_shards
    result = run_ppl("parity", "mixed", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["source"] == "files" and document["passed"] is True
    expected = reference_perplexity(logits=np.concatenate(parts))
    assert {r["backend"] for r in document["results"]} == BACKENDS
    for entry in document["results"]:
        assert relative(entry["reference"], expected) < 1e-12
        assert relative(entry["value"], expected) < 1e-5, entry


def test_compute_on_torch_with_mask_directory(workdir):
    import torch

    rng = np.random.default_rng(12)
    (workdir / "tm_in").mkdir()
    (workdir / "tm_mask").mkdir()
    values, masks = [], []
    for index in range(3):
        logits = rng.standard_normal((4, 9, 16)).astype(np.float32)
        mask = rng.random((4, 9)) < 0.6
        logits[~mask] = np.nan  # padding is never validated
        np.save(workdir / "tm_in" / f"shard{index}.npy", logits)
        # An integer 0/1 mask in a .pt file, as attention masks often are.
        torch.save(torch.from_numpy(mask.astype(np.int64)), workdir / "tm_mask" / f"m{index}.pt")
        values.append(logits)
        masks.append(mask)
    result = run_ppl(
        "compute", "tm_in", "--mask", "tm_mask", "--backend", "torch", "--json", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    expected = reference_perplexity(logits=np.concatenate(values), mask=np.concatenate(masks))
    assert relative(document["perplexity"], expected) < 1e-6
    assert document["num_distributions"] == int(np.concatenate(masks).sum())
    assert document["backend"] == "torch"
    assert document["files"][0]["mask"].endswith("m0.pt")


def test_compute_probs_on_jax_with_mask_key(workdir):
    rng = np.random.default_rng(13)
    probs = rng.random((6, 30))
    probs[probs < 0.4] = 0.0
    probs[0] = 0.0
    probs[0, 3] = 2.0
    mask = np.ones(6, bool)
    mask[4] = False
    np.savez(workdir / "probs.npz", probs=probs, keep=mask)
    result = run_ppl(
        "compute",
        "probs.npz",
        "--probs",
        "--mask-key",
        "keep",
        "--backend",
        "jax",
        "--json",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    # JAX runs with x64 on in the command, so float64 probs stay float64.
    assert relative(document["perplexity"], reference_perplexity(probs=probs, mask=mask)) < 1e-12
    assert document["num_distributions"] == 5 and document["input"] == "probs"

    text = run_ppl("compute", "probs.npz", "--probs", "--key", "probs", cwd=workdir)
    assert text.returncode == 0, text.stderr
    value = float(re.search(r"^perplexity\s+(\S+)$", text.stdout, re.M).group(1))
    assert relative(value, reference_perplexity(probs=probs)) < 1e-12
    assert re.search(r"^distributions\s+6$", text.stdout, re.M)


def test_compute_many_shards_in_bounded_memory(workdir):
    """16 shards of 16 MiB: the command's peak memory stays far below their 256 MiB total."""
    directory = workdir / "many"
    directory.mkdir()
    for index in range(16):
        logits = np.full((4096, 1024), float(index), np.float32)
        np.savez(directory / f"shard{index:02d}.npz", logits=logits)
    measure = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'ppl', 'compute', 'many', '--json'],"
        " capture_output=True, text=True)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print(r.stdout)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", measure],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    first, _, rest = result.stdout.partition("\n")
    returncode, peak_kib = (int(word) for word in first.split())
    assert returncode == 0
    document = json.loads(rest)
    # Constant rows: every distribution is uniform over 1024 entries.
    assert document["perplexity"] == pytest.approx(1024.0, rel=1e-6)
    assert document["num_distributions"] == 16 * 4096 and document["num_files"] == 16
    assert peak_kib < 160 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB for 256 MiB of shards"


def test_memory_mapped_file_is_read_in_blocks(workdir):
    rng = np.random.default_rng(14)
    logits = rng.standard_normal((10, 37, 24)).astype(np.float32)
    np.save(workdir / "blocks.npy", logits)
    np.save(workdir / "blocks_f.npy", np.asfortranarray(logits))
    bad = logits.copy()
    bad[8, 21, 5] = np.nan
    np.save(workdir / "blocks_bad.npy", bad)
    only_inf = logits.copy()
    only_inf[9, 36] = -np.inf
    np.save(workdir / "blocks_inf.npy", only_inf)
    expected = reference_perplexity(logits=logits)

    # 1000 bytes a block: 10 rows of 24 float32 at a time, 37 blocks (or 1 index of axis 0).
    for name in ("blocks.npy", "blocks_f.npy"):
        result = run_ppl("compute", name, "--block-bytes", "1000", "--json", cwd=workdir)
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        assert relative(document["perplexity"], expected) < 1e-6, name
        assert document["num_distributions"] == 370

    # An invalid value deep in the file is reported at its index in the file, not in the block.
    result = run_ppl("compute", "blocks_bad.npy", "--block-bytes", "1000", cwd=workdir)
    assert_one_line_error(result, "blocks_bad.npy:", "NaN", "at index (8, 21, 5)")
    result = run_ppl("compute", "blocks_inf.npy", "--block-bytes", "1000", cwd=workdir)
    assert_one_line_error(result, "blocks_inf.npy:", "only -inf", "at index (9, 36)")


def test_progress_bar_on_request_only(workdir, mixed_shards):
    result = run_ppl("compute", "mixed/a_float32.npy", "--progress", "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "ppl compute" in result.stderr
    json.loads(result.stdout)  # the bar leaves stdout alone
    quiet = run_ppl("compute", "mixed/a_float32.npy", cwd=workdir)
    assert quiet.returncode == 0 and quiet.stderr == ""


# --- without the optional packages --------------------------------------------------------------


def test_works_without_optional_packages(workdir, mixed_shards):
    without = ("torch", "jax", "jaxlib", "ml_dtypes", "tqdm", "safetensors")
    result = run_ppl("parity", "--json", cwd=workdir, without=without)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [backend["name"] for backend in document["backends"]] == ["numpy"]
    assert document["skipped"] == ["torch", "jax", "jax-x64"]
    bf16 = next(r for r in document["results"] if r["case"] == "bf16 logits")
    assert any("as float32" in note for note in bf16["notes"])

    result = run_ppl("compute", "mixed/a_float32.npy", "--progress", cwd=workdir, without=without)
    assert result.returncode == 0
    assert result.stderr.strip() == "ppl: note: tqdm is not installed; no progress bar"

    result = run_ppl("compute", "mixed/d_float64.safetensors", cwd=workdir, without=without)
    assert_one_line_error(result, "d_float64.safetensors", "needs the safetensors package")
    result = run_ppl("compute", "mixed/c_bfloat16.pt", cwd=workdir, without=without)
    assert_one_line_error(result, "c_bfloat16.pt", "needs torch")
    result = run_ppl("compute", "mixed", "--backend", "jax", cwd=workdir, without=without)
    assert_one_line_error(result, "--backend jax needs jax")
    result = run_ppl("parity", "--backend", "torch", cwd=workdir, without=without)
    assert_one_line_error(result, "--backend torch needs torch")


# --- bad files: one line on stderr, exit status 2 -----------------------------------------------


def _write_bad_files(directory: Path) -> None:
    good = np.random.default_rng(15).standard_normal((4, 10)).astype(np.float32)
    np.save(directory / "good.npy", good)
    data = (directory / "good.npy").read_bytes()
    (directory / "truncated.npy").write_bytes(data[:-17])
    (directory / "header.npy").write_bytes(data[:20])
    np.save(directory / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(directory / "ints.npy", np.arange(12).reshape(3, 4))
    np.save(directory / "scalar.npy", np.float32(1.0))
    np.save(directory / "novocab.npy", np.zeros((3, 0), np.float32))
    np.save(directory / "void.npy", np.zeros((3, 4), dtype="V2"))
    np.savez(directory / "two.npz", a=good, b=good)
    np.savez(directory / "objects.npz", logits=np.array([None], dtype=object))
    (directory / "truncated.npz").write_bytes((directory / "two.npz").read_bytes()[:100])
    nan = good.copy()
    nan[2, 7] = np.nan
    np.save(directory / "nan.npy", nan)
    negative = np.abs(good)
    negative[3, 1] = -0.5
    np.save(directory / "negative.npy", negative)
    np.save(directory / "mask_shape.npy", np.ones((4, 9), bool))
    np.save(directory / "mask_float.npy", np.ones(4, np.float32))
    np.save(directory / "mask_twos.npy", np.full(4, 2, np.int64))
    (directory / "notes.txt").write_text("hello")
    (directory / "empty").mkdir()


@pytest.fixture(scope="module")
def bad_files(workdir):
    directory = workdir / "bad"
    directory.mkdir()
    _write_bad_files(directory)
    return directory


BAD_INPUTS = [
    (["compute", "missing.npy"], ["missing.npy: no such file or directory"]),
    (["compute", "truncated.npy"], ["truncated.npy: cannot read as .npy", "truncated"]),
    (["compute", "header.npy"], ["header.npy: cannot read as .npy"]),
    (["compute", "objects.npy"], ["objects.npy: holds pickled Python objects"]),
    (["compute", "objects.npz"], ["objects.npz: holds pickled Python objects"]),
    (["compute", "truncated.npz"], ["truncated.npz: cannot read as .npz"]),
    (["compute", "two.npz"], ["two.npz: holds 2 entries", "--key"]),
    (["compute", "two.npz", "--key", "c"], ["two.npz: has no entry 'c'"]),
    (["compute", "good.npy", "--key", "a"], ["good.npy: a .npy file holds one array"]),
    (["compute", "ints.npy"], ["ints.npy: logits must be float16", "found int64"]),
    (["compute", "scalar.npy"], ["scalar.npy: holds a 0-d array"]),
    (["compute", "novocab.npy"], ["novocab.npy: has shape (3, 0)"]),
    (["compute", "void.npy"], ["void.npy:", "bfloat16 array saved by NumPy"]),
    (["compute", "nan.npy"], ["nan.npy: `logits` must not hold NaN", "at index (2, 7)"]),
    (["compute", "negative.npy", "--probs"], ["negative.npy: `probs` must be non-negative"]),
    (["compute", "good.npy", "--mask", "mask_shape.npy"], ["mask_shape.npy: the mask has shape"]),
    (["compute", "good.npy", "--mask", "mask_float.npy"], ["mask_float.npy: a mask must be"]),
    (["compute", "good.npy", "--mask", "mask_twos.npy"], ["mask_twos.npy: an integer mask"]),
    (["compute", "good.npy", "nan.npy", "--mask", "mask_twos.npy"], ["--mask gives 1 mask"]),
    (["compute", "notes.txt"], ["notes.txt: unsupported file type '.txt'"]),
    (["compute", "empty"], ["empty: directory holds no .npy"]),
    (["parity", "nan.npy"], ["nan.npy: `logits` must not hold NaN"]),
    (["parity", "--mask", "good.npy"], ["apply to files"]),
]


@pytest.mark.parametrize(("arguments", "fragments"), BAD_INPUTS, ids=lambda a: " ".join(a))
def test_bad_input_is_one_line_and_status_2(bad_files, arguments, fragments):
    result = run_ppl(*arguments, cwd=bad_files, without=("torch", "jax"))
    assert_one_line_error(result, *fragments)


def test_bad_torch_and_safetensors_files(workdir, bad_files):
    import torch

    torch.save({"logits": torch.ones(2, 3), "payload": Payload()}, bad_files / "pickled.pt")
    torch.save(torch.ones(4, 5), bad_files / "ok.pt")
    (bad_files / "truncated.pt").write_bytes((bad_files / "ok.pt").read_bytes()[:200])
    torch.save([torch.ones(3)], bad_files / "list.pt")
    from safetensors.numpy import save_file

    save_file({"logits": np.ones((2, 3), np.float32)}, str(bad_files / "ok.safetensors"))
    data = (bad_files / "ok.safetensors").read_bytes()
    (bad_files / "truncated.safetensors").write_bytes(data[:-4])
    # One call reads every bad file in turn and reports on the first: run each separately.
    for name, fragment in [
        ("pickled.pt", "holds pickled Python objects"),
        ("truncated.pt", "cannot read as .pt"),
        ("list.pt", "holds a list; expected a tensor or a dict of tensors"),
        ("truncated.safetensors", "cannot read as .safetensors"),
    ]:
        assert_one_line_error(run_ppl("compute", name, cwd=bad_files), f"{name}: {fragment}")


def test_usage(workdir):
    result = run_ppl("--version", cwd=workdir)
    assert result.returncode == 0 and result.stdout.startswith("ppl ")
    result = run_ppl("compute", "--help", cwd=workdir)
    assert result.returncode == 0 and "--mask-key" in result.stdout
    result = run_ppl("compute", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = run_ppl("compute", "x.npy", "--probs", "--logits", cwd=workdir)
    assert result.returncode == 2 and "not allowed with" in result.stderr
