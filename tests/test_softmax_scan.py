"""The kernels' vectorised exp (`_softmax_scan.exp_shifted`) against numpy's, over the whole range a softmax meets."""

from __future__ import annotations

import numpy as np
import pytest

softmax_scan = pytest.importorskip("lm_eval_retrieval.attention._softmax_scan")


@pytest.mark.parametrize("top", [0.0, 3.5, -20.25])
def test_exp_matches_numpy_to_a_few_ulps(top: float) -> None:
    logits = np.concatenate([np.linspace(-760.0, 30.0, 100_003), [-np.inf, top]]).astype(np.float32)
    got, total = softmax_scan.exp_shifted_array(logits, np.float64(top))
    shifted = logits.astype(np.float64) - top
    expected = np.where(shifted > softmax_scan.LOWEST, np.exp(shifted), 0.0)
    normal = expected > 0
    assert np.max(np.abs(got[normal] - expected[normal]) / expected[normal]) < 4e-16
    assert (got[~normal] == 0.0).all()  # below exp(-708) and -inf (an invisible key): exactly nothing
    assert total == pytest.approx(expected.sum(), rel=1e-14)


def test_no_kernel_helper_inlines_away_its_fastmath_flags() -> None:
    """numba compiles an `inline="always"` helper with its caller's flags, dropping its own fastmath (see
    `_numba.py`): every kernel helper that asks for fastmath must be a plain njit function."""
    import pathlib
    import re

    import lm_eval_retrieval.attention as attention

    root = pathlib.Path(attention.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.rglob("_*_scan.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"inline\s*=\s*\"always\".*fastmath|fastmath.*inline\s*=\s*\"always\"", line)
    ]
    assert len(list(root.rglob("_*_scan.py"))) >= 10 and not offenders, offenders


@pytest.mark.parametrize("top", [0.0, 3.5, -20.25])
def test_float32_exp_sum_matches_numpy(top: float) -> None:
    """`exp_sum32` (the log-normaliser sparq's alpha takes) against numpy's float64 exp over the range a softmax
    meets: within float32's rounding, and exactly nothing below exp(-87) and for -inf (an invisible key)."""
    logits = np.concatenate([np.linspace(-120.0, 0.0, 100_003) + top, [-np.inf]]).astype(np.float32)
    shifted = logits.astype(np.float64) - np.float32(top)
    expected = np.where(shifted > -87.0, np.exp(shifted), 0.0).sum()
    got = softmax_scan.exp_sum32_array(logits, np.float32(top))
    assert got == pytest.approx(expected, rel=2e-7)
    tiny = np.array([-np.inf, -200.0], dtype=np.float32)
    assert softmax_scan.exp_sum32_array(tiny, np.float32(0.0)) == 0.0
