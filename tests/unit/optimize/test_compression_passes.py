"""Compression passes: magnitude and channel pruning, low-rank factorization, weight clustering.

Every test builds a small model in code, runs the pass, checks the result with the ONNX checker and
ONNX Runtime, and compares with the input model: exactly where the transformation is exact, by the
stated bound where it is not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import onnx
import pytest
from onnx import helper

from edgefleet_core.errors import PassNotApplicable, TrainingUnsupported
from edgefleet_core.optimize.data import Dataset
from edgefleet_core.optimize.graph import get_array, parameter_count
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.optimize.passes._decompositions import cp_als, cp_reconstruct
from edgefleet_core.optimize.passes.base import OptimizationPass, TrainingRequest
from edgefleet_core.optimize.passes.clustering import METADATA_KEY, PER_CHANNEL_KEY, WeightClusteringPass
from edgefleet_core.optimize.passes.low_rank import LowRankFactorizationPass
from edgefleet_core.optimize.passes.pruning import ChannelPruningPass, MagnitudePruningPass
from edgefleet_core.resources.recipe import (
    OPTIONS_BY_PASS,
    ChannelPruningOptions,
    LowRankFactorizationOptions,
    MagnitudePruningOptions,
    PassOptions,
    WeightClusteringOptions,
)
from tests.support.compression_models import (
    Array,
    Builder,
    RecordingTrainer,
    cnn,
    context,
    conv_model,
    flatten_cnn,
    gemm_model,
    inputs_for,
    low_rank_matrix,
    matmul_model,
    mlp,
    residual_cnn,
    run,
    squeeze_cnn,
)

PASSES: list[tuple[type[OptimizationPass[Any]], PassOptions]] = [
    (MagnitudePruningPass, MagnitudePruningOptions(sparsity=0.5)),
    (ChannelPruningPass, ChannelPruningOptions(ratio=0.5)),
    (LowRankFactorizationPass, LowRankFactorizationOptions(method="tucker", energy=0.5, min_parameters=0)),
    (WeightClusteringPass, WeightClusteringOptions(bits=2)),
]


def checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    return model


def relative_error(got: Array, want: Array) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def data_for(model: onnx.ModelProto, *, labels: bool = False) -> Dataset:
    x = inputs_for(model, batch=8)
    return Dataset({"x": x}, np.zeros(8, np.int64) if labels else None)


class FailingTrainer:
    def __init__(self) -> None:
        self.calls = 0

    def train(self, model: onnx.ModelProto, data: Dataset, request: TrainingRequest) -> onnx.ModelProto:
        self.calls += 1
        raise TrainingUnsupported("op Foo cannot be differentiated")


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize(("pass_class", "options"), PASSES)
def test_pass_declares_its_crd_name_options_and_an_honest_capability(
    pass_class: type[OptimizationPass[Any]], options: PassOptions
) -> None:
    assert OPTIONS_BY_PASS[pass_class.pass_type] is pass_class.options_type
    assert isinstance(options, pass_class.options_type)
    assert not pass_class.capability.needs_trainer
    assert not pass_class.capability.needs_data
    assert not pass_class.capability.exact
    assert pass_class.capability.precision is None
    with pytest.raises(TypeError):
        pass_class(MagnitudePruningOptions() if pass_class is not MagnitudePruningPass else ChannelPruningOptions())


@pytest.mark.parametrize(("pass_class", "options"), PASSES)
def test_pass_leaves_its_input_alone_and_returns_a_valid_runnable_model(
    pass_class: type[OptimizationPass[Any]], options: PassOptions
) -> None:
    model = cnn()
    before = serialize(model)
    result = pass_class(options).apply(model, context(model))
    assert serialize(model) == before
    x = inputs_for(model)
    assert run(checked(result.model), x).shape == run(model, x).shape


# ----------------------------------------------------------------------------- magnitude pruning


def test_magnitude_pruning_reaches_the_target_in_every_layer_and_leaves_biases_dense() -> None:
    model = mlp()
    result = MagnitudePruningPass(MagnitudePruningOptions(sparsity=0.8)).apply(model, context(model))
    pruned = checked(result.model)
    for name in ("w1", "w6", "fc11"):
        weight = get_array(pruned, name)
        # At least the requested sparsity: the count of zeros is rounded up, never down.
        assert np.count_nonzero(weight == 0) == math.ceil(0.8 * weight.size - 1e-9)
        assert np.count_nonzero(weight == 0) / weight.size >= 0.8
        kept = get_array(model, name)[weight != 0]
        # The survivors are the largest in magnitude, unchanged.
        assert np.abs(kept).min() >= np.abs(get_array(model, name)[weight == 0]).max()
    for name in ("b3", "b8", "fcb12"):
        np.testing.assert_array_equal(get_array(pruned, name), get_array(model, name))
    assert result.metrics["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert result.metrics["pruned_tensors"] == 3
    assert result.metrics["zeros"] == pytest.approx(0.8 * result.metrics["parameters"], abs=2)
    assert run(pruned, inputs_for(model)).shape == (4, 10)


def test_magnitude_pruning_ranks_per_layer_so_a_small_scale_layer_survives() -> None:
    # A global threshold would remove every weight of the layer scaled by 1e-3; per layer keeps 30 %.
    model = mlp()
    tiny = np.asarray(get_array(model, "w6"), np.float32) * 1e-3
    model.graph.initializer[[i.name for i in model.graph.initializer].index("w6")].CopyFrom(
        onnx.numpy_helper.from_array(tiny.astype(np.float32), "w6")
    )
    result = MagnitudePruningPass(MagnitudePruningOptions(sparsity=0.7)).apply(model, context(model))
    weight = get_array(result.model, "w6")
    assert np.count_nonzero(weight) == weight.size - round(0.7 * weight.size)


def test_magnitude_pruning_leaves_shared_and_small_weights_dense_and_says_so() -> None:
    b = Builder(4)
    shared = b.const("shared", b.random(32, 32))
    x = b.node("MatMul", [b.node("MatMul", ["x", shared]), shared])
    x = b.node("MatMul", [x, b.const("own", b.random(32, 16))])
    x = b.node("MatMul", [x, b.const("small", b.random(16, 4))])
    model = b.model((32,), x)
    result = MagnitudePruningPass(MagnitudePruningOptions(sparsity=0.5)).apply(model, context(model))
    np.testing.assert_array_equal(get_array(result.model, "shared1"), get_array(model, "shared1"))
    np.testing.assert_array_equal(get_array(result.model, "small6"), get_array(model, "small6"))
    assert np.count_nonzero(get_array(result.model, "own4") == 0) == 256
    assert any("shared" in note and "shared1" in note for note in result.notes)
    assert any("under 128 elements" in note for note in result.notes)


def test_magnitude_pruning_without_a_prunable_weight_does_not_apply() -> None:
    model = mlp(sizes=(4, 8, 3))
    with pytest.raises(PassNotApplicable) as caught:
        MagnitudePruningPass(MagnitudePruningOptions()).apply(model, context(model))
    assert caught.value.pass_type == "MagnitudePruning"


@pytest.mark.parametrize(("labels", "alpha"), [(False, 1.0), (True, 0.5)])
def test_magnitude_pruning_fine_tunes_after_each_step_of_the_schedule(labels: bool, alpha: float) -> None:
    model = mlp()
    trainer = RecordingTrainer(nudge=0.01)  # moves every weight, zeros too
    options = MagnitudePruningOptions(sparsity=0.9, steps=3, fine_tune_epochs=2)
    ctx = context(model, trainer=trainer, data=data_for(model, labels=labels))
    result = MagnitudePruningPass(options).apply(model, ctx)

    assert len(trainer.requests) == 3
    for request in trainer.requests:
        assert (request.epochs, request.freeze_zeros, request.alpha) == (2, True, alpha)
        assert request.teacher is ctx.source
    seen = [np.mean(get_array(m, "w6") == 0) for m in trainer.models]
    assert seen == pytest.approx([0.3, 0.6, 0.9], abs=1e-3)
    # The pass re-imposes the mask after a trainer that let pruned weights drift.
    assert np.mean(get_array(result.model, "w6") == 0) == pytest.approx(0.9, abs=1e-3)
    assert result.metrics["fine_tune_rounds"] == 3
    assert not any("without fine-tuning" in note for note in result.notes)


@pytest.mark.parametrize(
    ("trainer", "data", "reason"),
    [
        (None, True, "no trainer"),
        (RecordingTrainer(), False, "no training data"),
        (FailingTrainer(), True, "op Foo cannot be differentiated"),
    ],
)
def test_magnitude_pruning_prunes_anyway_when_fine_tuning_is_impossible(
    trainer: RecordingTrainer | FailingTrainer | None, data: bool, reason: str
) -> None:
    model = mlp()
    ctx = context(model, trainer=trainer, data=data_for(model) if data else None)
    options = MagnitudePruningOptions(sparsity=0.5, steps=2, fine_tune_epochs=1)
    result = MagnitudePruningPass(options).apply(model, ctx)
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert any(note.startswith("pruned without fine-tuning") and reason in note for note in result.notes)
    if isinstance(trainer, FailingTrainer):
        assert trainer.calls == 1  # asked once, not at every step


# ----------------------------------------------------------------------------- channel pruning


@pytest.mark.parametrize(
    "model",
    [
        cnn(zero_filters=8, wide=16),
        flatten_cnn(zero_filters=4),
        flatten_cnn(zero_filters=4, reshape=True),
        squeeze_cnn(zero_filters=4),
    ],
    ids=["bn-gap-gemm", "silu-flatten-matmul", "reshape-matmul", "prelu-squeeze-matmul"],
)
def test_channel_pruning_of_all_zero_filters_is_exact(model: onnx.ModelProto) -> None:
    # The zero filters have the lowest norms, so ratio 0.5 removes exactly them: any mistake in
    # rewiring a consumer shows up as a different output.
    result = ChannelPruningPass(ChannelPruningOptions(ratio=0.5, fine_tune_epochs=0)).apply(model, context(model))
    pruned = checked(result.model)
    x = inputs_for(model, batch=3)
    np.testing.assert_allclose(run(pruned, x), run(model, x), atol=1e-5, rtol=0)
    assert result.metrics["channels_after"] == result.metrics["channels_before"] / 2
    assert result.metrics["parameters_after"] < result.metrics["parameters_before"]
    for node in pruned.graph.node:
        if node.op_type == "Reshape":  # [-1, C*H*W] would now be wrong; [0, -1] follows the channels
            assert get_array(pruned, node.input[1]).tolist() == [0, -1]
    # Initializers also declared as graph inputs (IR < 4 style) keep declarations that match.
    declared = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in pruned.graph.input}
    assert all(declared[i.name] == list(i.dims) for i in pruned.graph.initializer if i.name in declared)


def test_channel_pruning_half_the_filters_shrinks_parameters_file_and_flops() -> None:
    model = cnn(wide=32)
    options = ChannelPruningOptions(ratio=0.5, criterion="l2", fine_tune_epochs=0)
    result = ChannelPruningPass(options).apply(model, context(model))
    pruned = checked(result.model)

    # conv1 16→8 (+BN), conv2 32→16, conv3 32→16, classifier 32→16 inputs.
    expected = (8 * 3 * 9 + 8 + 4 * 8) + (16 * 8 * 9 + 16) + (16 * 16 * 9 + 16) + (10 * 16 + 10)
    assert parameter_count(pruned) == expected == result.metrics["parameters_after"]
    assert result.metrics["parameters_before"] == parameter_count(model)
    ratio = parameter_count(model) / expected
    assert ratio > 3.5
    assert len(serialize(model)) / len(serialize(pruned)) == pytest.approx(ratio, rel=0.15)
    assert result.metrics["conv_macs_after"] < result.metrics["conv_macs_before"] / 3
    x = inputs_for(model)
    output = run(pruned, x)
    assert output.shape == run(model, x).shape == (4, 10)
    assert np.isfinite(output).all()
    assert {n.op_type for n in pruned.graph.node} == {n.op_type for n in model.graph.node}
    assert "conv1: 16 → 8 channels" in result.notes


def test_channel_pruning_keeps_convs_that_feed_a_residual_add() -> None:
    model = residual_cnn()
    result = ChannelPruningPass(ChannelPruningOptions(ratio=0.5)).apply(model, context(model))
    pruned = checked(result.model)
    # conv0 loses half its filters, so conv1 reads fewer channels but keeps all 8 of its own.
    assert get_array(pruned, "w1").shape == (4, 3, 3, 3)
    assert get_array(pruned, "w3").shape == (8, 4, 3, 3)
    np.testing.assert_array_equal(get_array(pruned, "w5"), get_array(model, "w5"))
    skipped = [note for note in result.notes if note.startswith("kept all channels")]
    assert len(skipped) == 2
    assert all("residual Add" in note for note in skipped)
    assert result.metrics["skipped_convs"] == 2
    assert run(pruned, inputs_for(model)).shape == (4, 4)


def test_channel_pruning_keeps_a_conv_feeding_a_depthwise_conv() -> None:
    b = Builder(5)
    x = b.node("Relu", [b.conv("x", b.random(8, 3, 3, 3), name="conv1", pads=[1, 1, 1, 1])])
    x = b.conv(x, b.random(8, 1, 3, 3), name="depthwise", group=8, pads=[1, 1, 1, 1])
    x = b.conv(x, b.random(4, 8, 1, 1), name="pointwise")
    model = b.model((3, 6, 6), b.node("Flatten", [b.node("GlobalAveragePool", [x])]))
    with pytest.raises(PassNotApplicable) as caught:
        ChannelPruningPass(ChannelPruningOptions(ratio=0.5)).apply(model, context(model))
    assert "grouped convolution" in caught.value.reason


def test_channel_pruning_does_not_apply_when_the_only_conv_feeds_the_output() -> None:
    model = conv_model(np.ones((4, 2, 3, 3), np.float32))
    with pytest.raises(PassNotApplicable) as caught:
        ChannelPruningPass(ChannelPruningOptions(ratio=0.5)).apply(model, context(model))
    assert "graph output" in caught.value.reason


@pytest.mark.parametrize(("criterion", "removed"), [("l1", 1), ("l2", 0)])
def test_channel_pruning_ranks_filters_by_the_chosen_norm(criterion: Literal["l1", "l2"], removed: int) -> None:
    # Filter 0: many small weights (L1 9, L2 1); filter 1: one large weight (L1 2, L2 2).
    weight = np.ones((3, 1, 3, 3), np.float32)
    weight[0] = 1 / 3
    weight[1] = 0
    weight[1, 0, 1, 1] = 2
    weight[2] = 5
    b = Builder(6)
    x = b.node("Relu", [b.conv("x", weight, name="conv1", pads=[1, 1, 1, 1])])
    model = b.model((1, 5, 5), b.conv(x, b.random(2, 3, 1, 1), name="conv2"), output_rank=4)
    options = ChannelPruningOptions(ratio=0.34, criterion=criterion, fine_tune_epochs=0)
    result = ChannelPruningPass(options).apply(model, context(model))
    kept = [i for i in range(3) if i != removed]
    np.testing.assert_array_equal(get_array(result.model, "w1"), weight[kept])
    np.testing.assert_array_equal(get_array(result.model, "w3"), get_array(model, "w3")[:, kept])


def test_channel_pruning_steps_with_fine_tuning_between_them() -> None:
    model = cnn(wide=16)
    trainer = RecordingTrainer()
    options = ChannelPruningOptions(ratio=0.5, steps=2, fine_tune_epochs=3)
    result = ChannelPruningPass(options).apply(model, context(model, trainer=trainer, data=data_for(model)))
    assert [r.epochs for r in trainer.requests] == [3, 3]
    assert not any(r.freeze_zeros for r in trainer.requests)
    assert [get_array(m, "w1").shape[0] for m in trainer.models] == [12, 8]
    assert get_array(result.model, "w1").shape[0] == 8
    assert result.metrics["fine_tune_rounds"] == 2


# ----------------------------------------------------------------------------- low-rank factorization


def low_rank_options(**values: object) -> LowRankFactorizationOptions:
    return LowRankFactorizationOptions.model_validate({"minParameters": 0, **values})


@pytest.mark.parametrize(
    "build",
    [
        matmul_model,
        lambda w: matmul_model(w, batch_dims=2),
        lambda w: gemm_model(w.T.copy(), trans_b=1, alpha=0.7, beta=1.3),
        lambda w: gemm_model(w, trans_b=0, alpha=1.5, beta=0.5),
        lambda w: gemm_model(w, trans_b=0, trans_a=1),
    ],
    ids=["matmul", "matmul-3d", "gemm-transB", "gemm", "gemm-transA"],
)
def test_svd_at_full_rank_reproduces_matmul_and_gemm(build: Callable[[Array], onnx.ModelProto]) -> None:
    weight = low_rank_matrix(np.random.default_rng(1), 64, 48, rank=5)
    model = build(weight)
    result = LowRankFactorizationPass(low_rank_options(energy=1.0)).apply(model, context(model))
    factorized = checked(result.model)
    x = inputs_for(model)
    np.testing.assert_allclose(run(factorized, x), run(model, x), atol=1e-4, rtol=0)
    assert result.metrics["rank.fc"] == 5
    assert (result.metrics["parameters_before"], result.metrics["parameters_after"]) == (64 * 48, 5 * (64 + 48))
    assert "w1" not in {init.name for init in factorized.graph.initializer}


def test_svd_at_reduced_rank_halves_parameters_of_a_wide_layer_and_stays_close() -> None:
    rng = np.random.default_rng(2)
    basis_u, _ = np.linalg.qr(rng.standard_normal((256, 256)))
    basis_v, _ = np.linalg.qr(rng.standard_normal((256, 256)))
    spectrum = 0.7 ** np.arange(256)  # a weight with quickly decaying singular values
    weight = ((basis_u * spectrum) @ basis_v.T).astype(np.float32)
    model = matmul_model(weight)
    result = LowRankFactorizationPass(low_rank_options(energy=0.5)).apply(model, context(model))
    rank = int(result.metrics["rank.fc"])
    kept = result.metrics["energy.fc"]
    assert kept >= 0.5
    assert rank == int(np.searchsorted(np.cumsum(spectrum**2) / np.sum(spectrum**2), 0.5) + 1)
    assert result.metrics["parameters_before"] / result.metrics["parameters_after"] >= 2
    assert parameter_count(result.model) < parameter_count(model) / 2
    # Inputs with white spectrum: the output error is the discarded energy's share.
    x = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    bias = np.asarray(get_array(model, "bias2"), np.float32)
    error = relative_error(run(result.model, x) - bias, run(model, x) - bias)
    assert error == pytest.approx(math.sqrt(1 - kept), rel=0.25)


def test_rank_ratio_sets_the_rank_and_layers_without_saving_are_kept() -> None:
    weight = np.random.default_rng(4).standard_normal((96, 64)).astype(np.float32)
    model = matmul_model(weight)
    result = LowRankFactorizationPass(low_rank_options(rank_ratio=0.1)).apply(model, context(model))
    assert result.metrics["rank.fc"] == math.ceil(0.1 * 64)
    with pytest.raises(PassNotApplicable) as caught:
        LowRankFactorizationPass(low_rank_options(energy=0.99)).apply(model, context(model))
    assert "no saving" in caught.value.reason
    with pytest.raises(PassNotApplicable) as caught:
        LowRankFactorizationPass(low_rank_options(rank_ratio=0.1, minParameters=10_000)).apply(model, context(model))
    assert "under 10000 parameters" in caught.value.reason


def spatially_separable(rng: np.random.Generator) -> Array:
    """16×8×3×3 kernel whose (C·kh)×(O·kw) matrix has rank 4."""
    matrix = low_rank_matrix(rng, 8 * 3, 16 * 3, rank=4)
    return matrix.reshape(8, 3, 16, 3).transpose(2, 0, 1, 3).copy()


def tucker_low_rank(rng: np.random.Generator) -> Array:
    """16×8×3×3 kernel of multilinear rank (5, 3) on its channel modes."""
    core = rng.standard_normal((5, 3, 3, 3))
    outer, inner = rng.standard_normal((16, 5)), rng.standard_normal((8, 3))
    return np.asarray(np.einsum("rsij,or,cs->ocij", core, outer, inner) / 10, dtype=np.float32)


def cp_low_rank(rng: np.random.Generator) -> Array:
    """16×8×3×3 kernel of CP rank 4."""
    factors = [rng.standard_normal((size, 4)) for size in (16, 8, 3, 3)]
    return np.asarray(cp_reconstruct(factors) / 10, dtype=np.float32)


@pytest.mark.parametrize(
    ("method", "make", "attrs", "ranks", "tolerance"),
    [
        ("spatialSvd", spatially_separable, {"pads": [1, 0, 2, 1], "strides": [2, 2]}, {"rank.conv": 4}, 1e-4),
        (
            "tucker",
            tucker_low_rank,
            {"pads": [1, 1, 1, 1], "strides": [2, 2]},
            {"rank.conv.out": 5, "rank.conv.in": 3},
            1e-4,
        ),
        ("cp", cp_low_rank, {"pads": [1, 1, 1, 1], "strides": [2, 1], "dilations": [1, 2]}, {"rank.conv": 4}, 1e-3),
    ],
)
def test_conv_decomposition_at_full_rank_reproduces_a_padded_strided_conv(
    method: str,
    make: Callable[[np.random.Generator], Array],
    attrs: dict[str, list[int]],
    ranks: dict[str, float],
    tolerance: float,
) -> None:
    model = conv_model(make(np.random.default_rng(5)), **attrs)
    # CP-ALS converges to, not onto, an exact decomposition: its energy target leaves that slack.
    energy = 0.99999 if method == "cp" else 1.0
    result = LowRankFactorizationPass(low_rank_options(method=method, energy=energy)).apply(model, context(model))
    factorized = checked(result.model)
    convs = {"spatialSvd": 2, "tucker": 3, "cp": 4}[method]
    assert [n.op_type for n in factorized.graph.node] == ["Conv"] * convs + ["Relu"]
    x = inputs_for(model)
    np.testing.assert_allclose(run(factorized, x), run(model, x), atol=tolerance, rtol=0)
    assert result.metrics["parameters_after"] < result.metrics["parameters_before"] / 3
    assert {key: value for key, value in result.metrics.items() if key.startswith("rank.")} == ranks


def test_conv_decomposition_at_reduced_rank_keeps_the_energy_it_reports() -> None:
    rng = np.random.default_rng(6)
    model = conv_model((rng.standard_normal((16, 16, 3, 3)) / 12).astype(np.float32), pads=[1, 1, 1, 1])
    x = inputs_for(model)
    for method in ("spatialSvd", "tucker", "cp"):
        result = LowRankFactorizationPass(low_rank_options(method=method, rank_ratio=0.25)).apply(model, context(model))
        assert result.metrics["parameters_after"] < result.metrics["parameters_before"]
        assert 0 < result.metrics["energy.conv"] < 1
        assert run(checked(result.model), x).shape == run(model, x).shape


def test_cp_als_reports_the_fit_of_the_factors_it_returns() -> None:
    weight = np.random.default_rng(8).standard_normal((12, 10, 3, 3))
    result = cp_als(weight, 6, seed=3)
    error = np.sum((cp_reconstruct(result.factors) - weight) ** 2) / np.sum(weight**2)
    assert 0 < result.fit < 1
    assert result.fit == pytest.approx(1 - error, abs=1e-9)
    assert cp_als(weight, 6, seed=3).fit == result.fit  # deterministic for a seed


def test_each_method_touches_its_own_kind_of_layer_only() -> None:
    with pytest.raises(PassNotApplicable) as caught:
        LowRankFactorizationPass(low_rank_options(method="tucker")).apply(mlp(), context(mlp()))
    assert "Conv" in caught.value.reason
    model = conv_model(np.ones((4, 2, 3, 3), np.float32))
    with pytest.raises(PassNotApplicable):
        LowRankFactorizationPass(low_rank_options(method="svd")).apply(model, context(model))


def test_conv_with_same_auto_padding_is_kept_with_a_reason() -> None:
    weight = spatially_separable(np.random.default_rng(7))
    model = conv_model(weight, auto_pad="SAME_UPPER")
    with pytest.raises(PassNotApplicable) as caught:
        LowRankFactorizationPass(low_rank_options(method="spatialSvd", energy=1.0)).apply(model, context(model))
    assert "auto_pad SAME_UPPER" in caught.value.reason


# ----------------------------------------------------------------------------- weight clustering


def test_clustering_keeps_at_most_k_values_zero_included_and_pruned_zeros_stay_zero() -> None:
    model = mlp()
    pruned = MagnitudePruningPass(MagnitudePruningOptions(sparsity=0.9)).apply(model, context(model)).model
    result = WeightClusteringPass(WeightClusteringOptions(bits=2)).apply(pruned, context(model))
    clustered = checked(result.model)
    for name in ("w1", "w6", "fc11"):
        before, after = get_array(pruned, name), get_array(clustered, name)
        assert after.dtype == np.float32
        assert np.unique(after).size <= 4
        np.testing.assert_array_equal(after == 0, before == 0)
    assert json.loads({p.key: p.value for p in clustered.metadata_props}[METADATA_KEY]) == {
        "w1": 2,
        "w6": 2,
        "fc11": 2,
    }
    assert result.metrics["unique_values_max"] == 4
    assert result.metrics["clustered_tensors"] == 3


def test_clustering_with_one_bit_keeps_zero_and_one_shared_value() -> None:
    b = Builder(8)
    weight = b.random(16, 8)
    weight[::2] = 0
    model = b.model((16,), b.node("MatMul", ["x", b.const("w", weight)]))
    result = WeightClusteringPass(WeightClusteringOptions(bits=1)).apply(model, context(model))
    clustered = get_array(result.model, "w1")
    assert set(np.unique(clustered[::2])) == {0.0}
    assert np.unique(clustered[1::2]).size == 1
    assert clustered[1, 0] == pytest.approx(weight[1::2].mean(), rel=1e-5)


def test_clustering_at_eight_bits_keeps_outputs_close_and_is_deterministic() -> None:
    model = cnn()
    options = WeightClusteringOptions(bits=8)
    first = WeightClusteringPass(options).apply(model, context(model))
    second = WeightClusteringPass(options).apply(model, context(model))
    assert serialize(first.model) == serialize(second.model)
    x = inputs_for(model)
    assert relative_error(run(first.model, x), run(model, x)) < 1e-2
    assert first.metrics["unique_values_max"] <= 256


def test_per_channel_clustering_has_one_codebook_per_output_channel() -> None:
    model = mlp()
    result = WeightClusteringPass(WeightClusteringOptions(bits=2, per_channel=True)).apply(model, context(model))
    clustered = result.model
    for name, axis in (("w1", 1), ("fc11", 0)):
        weight = np.moveaxis(get_array(clustered, name), axis, 0)
        assert max(np.unique(channel).size for channel in weight) == 4
        assert np.unique(weight).size > 4
    props = {p.key: p.value for p in clustered.metadata_props}
    assert json.loads(props[PER_CHANNEL_KEY]) == {"w1": 1, "w6": 1, "fc11": 0}


def test_clustering_merges_with_metadata_already_in_the_model() -> None:
    model = mlp()
    helper.set_model_props(model, {METADATA_KEY: json.dumps({"other": 3}), "author": "me"})
    result = WeightClusteringPass(WeightClusteringOptions(bits=4)).apply(model, context(model))
    props = {p.key: p.value for p in result.model.metadata_props}
    assert json.loads(props[METADATA_KEY]) == {"other": 3, "w1": 4, "w6": 4, "fc11": 4}
    assert props["author"] == "me"


def test_clustering_without_a_large_enough_weight_does_not_apply() -> None:
    model = mlp(sizes=(4, 8, 3))
    with pytest.raises(PassNotApplicable):
        WeightClusteringPass(WeightClusteringOptions()).apply(model, context(model))
