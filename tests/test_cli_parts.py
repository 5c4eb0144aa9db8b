"""The command line's own pieces, in process: bfloat16 rounding, the float64 reference, `main`.

`ppl._reference` is the check `ppl parity` relies on, so it is itself checked against the test
suite's reference; the bfloat16 rounding of the embedded cases is checked against PyTorch's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ppl._cases import bfloat16_bits_to_float32, embedded_cases, round_to_bfloat16
from ppl._reference import ReferencePerplexity
from tests.reference import reference_perplexity


def test_bfloat16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    scaled = (rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000)).astype(
        np.float32
    )
    # Halfway cases: the 16 dropped bits are exactly 0x8000, so ties must go to even.
    halfway = (rng.integers(0, 2**15, 1000).astype(np.uint32) << 16 | 0x8000).view(np.float32)
    special = np.array([0.0, -0.0, 1.0, -1.0, 3e38, -3e38, 1e-40], np.float32)
    values = np.concatenate([scaled, halfway[np.isfinite(halfway)], special])
    ours = round_to_bfloat16(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.uint16).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert np.array_equal(
        bfloat16_bits_to_float32(ours), torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    )


def test_cases_are_seeded_and_bfloat16_values_exact():
    first, second = embedded_cases(), embedded_cases()
    assert [case.name for case in first] == [case.name for case in second]
    for a, b in zip(first, second, strict=True):
        for batch_a, batch_b in zip(a.batches, b.batches, strict=True):
            np.testing.assert_array_equal(batch_a.values, batch_b.values)
    bf16 = next(case for case in first if case.bfloat16)
    values = bf16.batches[0].values
    np.testing.assert_array_equal(bfloat16_bits_to_float32(round_to_bfloat16(values)), values)


def test_own_reference_matches_the_test_reference():
    rng = np.random.default_rng(1)
    # Wide rows so that the reference works through several blocks.
    logits = 3 * rng.standard_normal((300, 5000))
    logits[rng.random(logits.shape) < 0.2] = -np.inf
    probs = rng.random((50, 7)).astype(np.float32)
    probs[probs < 0.3] = 0
    probs[0] = [0, 0, 1, 0, 0, 0, 0]
    mask = rng.random(300) < 0.7

    reference = ReferencePerplexity()
    reference.update(logits[:100], "logits", mask[:100])
    reference.update(logits[100:], "logits", mask[100:])
    assert reference.num_distributions == mask.sum()
    assert reference.value() == pytest.approx(
        reference_perplexity(logits=logits, mask=mask), rel=1e-13
    )

    reference = ReferencePerplexity()
    reference.update(probs, "probs")
    assert reference.value() == pytest.approx(reference_perplexity(probs=probs), rel=1e-13)
    assert np.isnan(ReferencePerplexity().value())


def test_main_in_process(capsys):
    from ppl.__main__ import main

    assert main(["parity", "--backend", "numpy", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["passed"] is True
    assert main(["compute", "no-such-file.npy"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ppl: error: no-such-file.npy: no such file or directory"
    )
