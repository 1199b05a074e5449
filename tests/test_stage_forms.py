"""Per-stage precision by measurement: the timing of candidate forms and the choice among them."""

import math

import numpy as np

from dmpo_edge.compile.stage_forms import choose_form, time_forms


def test_the_fastest_form_within_the_budget_wins_and_fp32_is_always_admissible():
    t = {"fp32": {1: 1.0, 32: 10.0}, "int8_qdq": {1: 0.5, 32: 5.0}, "int8_u8": {1: 0.4, 32: 4.0}}
    # the U8 form is fastest but loses 2 points: the Q/DQ form is chosen
    form, why = choose_form(t, {"int8_qdq": 0.3, "int8_u8": 2.0}, budget_points=0.5)
    assert form == "int8_qdq" and "2.00x" in why
    # nothing within the budget: FP32
    assert choose_form(t, {"int8_qdq": 0.9, "int8_u8": 2.0}, 0.5)[0] == "fp32"
    # INT8 slower than FP32 at one batch size and faster at the other: the mean relative time decides
    slow = {"fp32": {1: 1.0, 32: 10.0}, "int8_u8": {1: 1.5, 32: 6.0}}  # 1.5x and 0.6x: mean 1.05 -> FP32
    assert choose_form(slow, {"int8_u8": 0.0}, 0.5)[0] == "fp32"
    # a form that failed to build has no timings and is never chosen
    assert choose_form({"fp32": {1: 1.0}, "int8_u8": {}}, {"int8_u8": 0.0}, 0.5)[0] == "fp32"
    # a tie goes to the reference
    assert choose_form({"fp32": {1: 1.0}, "int8_u8": {1: 1.0}}, {"int8_u8": 0.0}, 0.5)[0] == "fp32"


def test_time_forms_times_real_graphs_at_each_batch(toy_bundle):
    tb = toy_bundle(num_stages=3, classes=4, seed=11, cpu_variant=True)
    from dmpo_edge.bundle import Bundle

    b = Bundle.load(tb.path)
    x = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    t = time_forms({"fp32": b.stage_path(0), "cpu": b.stage_path(0, "cpu")}, {"input": x}, repeats=3)
    assert set(t) == {"fp32", "cpu"} and all(set(v) == {1, 32} for v in t.values())
    assert all(0 < ms < 1000 and math.isfinite(ms) for v in t.values() for ms in v.values())
    # stage k > 0 feeds: features and keep_idx are cut to the batch together
    feats = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    t1 = time_forms({"fp32": b.stage_path(1)}, {"features_in": feats, "keep_idx": np.arange(32, dtype=np.int32)},
                    batches=(1, 8), repeats=2)
    assert set(t1["fp32"]) == {1, 8}
