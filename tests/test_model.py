"""The model package: parity with the original, parameter counts, shapes, checkpoints, timm registration."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import (
    REFERENCE_LINEAR_BIAS,
    normalise_uint8,
    reference_features_extractor,
    reference_homography_regression,
)

from model import CCT, FeaturesExtractor, HomographyRegression, compute_similarity, dhe
from model.cct import load_pretrained_cct, resize_positional_embedding
from model.checkpoints import (
    CheckpointMismatchError,
    load_features_extractor,
    load_homography_regression,
    save_state_dict,
)
from model.dhe import attention_heads


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def reference_outputs(reference, device):
    """Our outputs on the reference images with the reference weights, computed on `device`, returned on the CPU."""
    features_extractor = reference_features_extractor().to(device)
    homography_regression = reference_homography_regression().to(device)
    with torch.no_grad():
        images = normalise_uint8(reference["images_uint8"]).to(device)
        global_descriptors, local_features = features_extractor(images)
        correlation = compute_similarity(local_features[[0, 0, 0]], local_features[1:4])
        points = homography_regression(correlation)
    outputs = {"global": global_descriptors, "local": local_features, "correlation": correlation, "points": points}
    assert all(value.device == images.device for value in outputs.values())
    return {key: value.cpu() for key, value in outputs.items()}


# ---------------------------------------------------------------- parity with the original


def test_global_descriptors_match_original(reference, reference_outputs):
    assert reference_outputs["global"].shape == (4, 384)
    assert relative_error(reference_outputs["global"], reference["global_descriptors"]) < 1e-4


def test_local_features_match_original_at_fp16_precision(reference, reference_outputs):
    expected = reference["local_features_fp16"].float()
    assert reference_outputs["local"].shape == (4, 384, 24, 24)
    # The reference is stored in fp16 (about 3 significant digits).
    torch.testing.assert_close(reference_outputs["local"], expected, atol=1e-3, rtol=2e-3)


def test_correlation_matches_original(reference, reference_outputs):
    expected = reference["correlation_img0_vs_img1_first_8_channels"]
    ours = reference_outputs["correlation"][:1, :8]
    assert relative_error(ours, expected) < 1e-4


def test_dhe_points_match_original(reference, reference_outputs):
    expected = reference["dhe_points_img0_vs_img123"]
    bias = torch.tensor(REFERENCE_LINEAR_BIAS, dtype=torch.float32).view(1, 8, 2)
    assert reference_outputs["points"].shape == (3, 8, 2)
    assert relative_error(reference_outputs["points"], expected) < 1e-4
    # The head's own contribution (beyond the bias) must match as well, not only the bias that dominates.
    assert relative_error(reference_outputs["points"] - bias, expected - bias) < 1e-3


def test_correlation_layout_is_column_major_over_query_positions():
    generator = torch.Generator().manual_seed(0)
    features_a = torch.randn(2, 5, 3, 4, generator=generator)
    features_b = torch.randn(2, 5, 3, 4, generator=generator)
    correlation = compute_similarity(features_a, features_b)
    expected = torch.zeros(2, 12, 3, 4)
    for row_a in range(3):
        for col_a in range(4):
            channel = col_a * 3 + row_a
            expected[:, channel] = torch.einsum("bc,bchw->bhw", features_a[:, :, row_a, col_a], features_b)
    expected = torch.nn.functional.normalize(expected.clamp(min=0), dim=1)
    torch.testing.assert_close(correlation, expected)


# ---------------------------------------------------------------- sizes and trainable parameters


def test_parameter_counts_at_defaults():
    features_extractor = FeaturesExtractor()
    homography_regression = HomographyRegression()
    assert sum(p.numel() for p in features_extractor.parameters()) == 13_260_098
    assert sum(p.numel() for p in homography_regression.parameters()) == 27_802_000


def test_state_dict_keys_and_shapes_are_the_originals(checkpoint_keys):
    for module, name in (
        (FeaturesExtractor(), "features_extractor"),
        (HomographyRegression(), "homography_regression"),
    ):
        ours = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert ours == checkpoint_keys[name]


def test_trainable_parameters_match_original(checkpoint_keys):
    features_extractor = FeaturesExtractor(trunc_te=8, freeze_te=5)
    trainable = [name for name, p in features_extractor.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(checkpoint_keys["trainable_with_trunc_te_8_freeze_te_5"])


def test_freeze_te_minus_one_trains_every_block():
    features_extractor = FeaturesExtractor(resize=(64, 64), trunc_te=3, freeze_te=-1)
    frozen = {name for name, p in features_extractor.named_parameters() if not p.requires_grad}
    assert all(".blocks." not in name for name in frozen)
    assert "encoder.tokenizer.conv_layers.0.0.weight" in frozen


@pytest.mark.parametrize(("resize", "heads"), [((96, 96), 12), ((192, 128), 12), ((160, 160), 10)])
def test_shapes_follow_resize(resize, heads):
    height, width = resize
    grid = (height // 16, width // 16)
    features_extractor = FeaturesExtractor(resize=resize, trunc_te=2, freeze_te=1).eval()
    homography_regression = HomographyRegression(resize=resize).eval()
    with torch.no_grad():
        global_descriptors, local_features = features_extractor(torch.randn(2, 3, height, width))
        correlation = compute_similarity(local_features, local_features.flip(0))
        points = homography_regression(correlation)
    assert global_descriptors.shape == (2, 384)
    assert local_features.shape == (2, 384, *grid)
    torch.testing.assert_close(local_features.norm(dim=1), torch.ones(2, *grid))
    assert correlation.shape == (2, grid[0] * grid[1], *grid)
    assert points.shape == (2, 8, 2)
    assert homography_regression.pe.shape == (1, grid[0] * grid[1], grid[0] * grid[1])
    assert homography_regression.encoder.layers[0].self_attn.num_heads == heads


def test_attention_heads_rule():
    assert attention_heads(576) == 12
    assert attention_heads(36) == 12
    assert attention_heads(100) == 10
    assert attention_heads(49) == 7
    assert attention_heads(13) == 1


@pytest.mark.parametrize("resize", [(100, 96), (96, 0), (8, 8)])
def test_resize_not_multiple_of_16_is_an_error(resize):
    with pytest.raises(ValueError, match="multiple of 16"):
        FeaturesExtractor(resize=resize)
    with pytest.raises(ValueError, match="multiple of 16"):
        HomographyRegression(resize=resize)


def test_other_image_sizes_resize_the_positional_embedding():
    features_extractor = FeaturesExtractor(resize=(64, 64), trunc_te=1).eval()
    with torch.no_grad():
        global_descriptors, local_features = features_extractor(torch.randn(1, 3, 96, 64))
    assert global_descriptors.shape == (1, 384)
    assert local_features.shape == (1, 384, 6, 4)
    with pytest.raises(ValueError, match=r"70 x 64: each side must be a multiple of 16 \(built for \(64, 64\)\)"):
        features_extractor(torch.zeros(1, 3, 70, 64))


def test_timm_registry_builds_the_backbone_offline():
    backbone = timm.create_model("cct_14_7x2_384")
    assert isinstance(backbone, CCT)
    assert len(backbone.classifier.blocks) == 14
    assert backbone.grid_size == (24, 24)
    with pytest.raises(ValueError, match="pretrained_path"):
        timm.create_model("cct_14_7x2_384", pretrained=True)


# ---------------------------------------------------------------- checkpoints


def random_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def assert_loaded(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_load_benchmark_backbone_checkpoint(checkpoint_keys, tmp_path):
    state_dict = random_state_dict(checkpoint_keys["vg_benchmark_model_state_dict"])
    # The benchmark's checkpoints also hold numpy recalls and scalars next to the weights.
    checkpoint = {"epoch_num": 3, "model_state_dict": state_dict, "recalls": np.array([80.1, 90.2]), "best_r5": 90.2}
    path = tmp_path / "CCT14_msls.pth"
    torch.save(checkpoint, path)
    features_extractor = load_features_extractor(FeaturesExtractor(), path)
    expected = {
        k.replace("module.backbone.", "encoder.").replace("module.aggregation.", "pool."): v
        for k, v in state_dict.items()
    }
    assert_loaded(features_extractor, expected)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_load_features_extractor_state_dict(checkpoint_keys, tmp_path, prefix):
    state_dict = random_state_dict(checkpoint_keys["features_extractor"], seed=1)
    path = tmp_path / "finetunedCCT14_pitts30k.torch"
    torch.save({prefix + k: v for k, v in state_dict.items()}, path)
    assert_loaded(load_features_extractor(FeaturesExtractor(), path), state_dict)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_load_homography_regression_state_dict(checkpoint_keys, tmp_path, prefix):
    state_dict = random_state_dict(checkpoint_keys["homography_regression"], seed=2)
    path = tmp_path / "finetunedDHE_msls.torch"
    torch.save({prefix + k: v for k, v in state_dict.items()}, path)
    assert_loaded(load_homography_regression(HomographyRegression(), path), state_dict)


def test_mismatched_checkpoint_names_the_keys(checkpoint_keys):
    state_dict = random_state_dict(checkpoint_keys["features_extractor"])
    del state_dict["pool.1.p"]
    state_dict["encoder.classifier.extra.weight"] = torch.zeros(3)
    state_dict["encoder.classifier.positional_emb"] = torch.zeros(1, 100, 384)
    with pytest.raises(CheckpointMismatchError) as error:
        load_features_extractor(FeaturesExtractor(), state_dict)
    message = str(error.value)
    assert "missing keys: pool.1.p" in message
    assert "unexpected keys: encoder.classifier.extra.weight" in message
    assert "encoder.classifier.positional_emb (checkpoint (1, 100, 384), model (1, 576, 384))" in message


def test_checkpoint_at_other_resize_does_not_fit_head(checkpoint_keys):
    state_dict = random_state_dict(checkpoint_keys["homography_regression"])
    with pytest.raises(CheckpointMismatchError) as error:
        load_homography_regression(HomographyRegression(resize=(96, 96)), state_dict)
    message = str(error.value)
    assert "mis-shaped keys: encoder.layers.0.linear1.weight (checkpoint (2048, 576), model (2048, 36))" in message
    assert "(68 in all)" in message
    assert "another --resize" in message


def test_checkpoint_of_the_wrong_part_is_named(checkpoint_keys):
    head = random_state_dict(checkpoint_keys["homography_regression"])
    with pytest.raises(CheckpointMismatchError, match="DHE head checkpoint.*--resume_hr"):
        load_features_extractor(FeaturesExtractor(), head)
    backbone = random_state_dict(checkpoint_keys["features_extractor"])
    with pytest.raises(CheckpointMismatchError, match="features-extractor checkpoint.*--resume_fe"):
        load_homography_regression(HomographyRegression(), backbone)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.torch"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint .*broken.torch is a text file"):
        load_homography_regression(HomographyRegression(), path)
    with pytest.raises(FileNotFoundError, match="missing.torch"):
        load_homography_regression(HomographyRegression(), tmp_path / "missing.torch")


def test_saved_checkpoints_use_the_original_keys_and_reload(tmp_path):
    head = HomographyRegression(resize=(64, 64))
    path = tmp_path / "checkpoints" / "homography_regression_009.torch"
    save_state_dict(head, path)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(head.state_dict())
    reloaded = load_homography_regression(HomographyRegression(resize=(64, 64)), path)
    assert_loaded(reloaded, head.state_dict())
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_pretrained_imagenet_cct_with_resized_positional_embedding(tmp_path):
    imagenet = CCT(img_size=(384, 384), num_classes=1000)
    path = tmp_path / "cct_14_7x2_384_imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    features_extractor = FeaturesExtractor(resize=(192, 128), trunc_te=2, freeze_te=0, pretrained_cct=path)
    ours = features_extractor.encoder.state_dict()
    torch.testing.assert_close(
        ours["classifier.blocks.1.linear1.weight"], imagenet.state_dict()["classifier.blocks.1.linear1.weight"]
    )
    expected_embedding = resize_positional_embedding(imagenet.classifier.positional_emb.detach(), (12, 8))
    torch.testing.assert_close(ours["classifier.positional_emb"], expected_embedding)
    assert expected_embedding.shape == (1, 96, 384)


def test_pretrained_cct_that_does_not_fit_is_an_error(tmp_path):
    path = tmp_path / "not_cct.pth"
    torch.save({"tokenizer.conv_layers.0.0.weight": torch.zeros(64, 3, 5, 5)}, path)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_pretrained_cct(CCT(img_size=(64, 64)), path)


@pytest.mark.parametrize("train", [False, True])
def test_head_encoders_match_torch_transformer_encoder(train):
    torch.manual_seed(0)
    head = HomographyRegression(resize=(96, 64)).train(train)
    for parameter in head.parameters():  # non-trivial weights everywhere (pe starts at zero)
        parameter.data.normal_(0, 0.05)
    correlation = compute_similarity(torch.randn(3, 16, 6, 4), torch.randn(3, 16, 6, 4))
    sequence = correlation.reshape(3, 24, 24).transpose(1, 2) + head.pe.transpose(1, 2)
    encoded = head.encoder(sequence)
    expected = head.linear((head.encoder2(encoded) + encoded).transpose(1, 2).reshape(3, -1)).reshape(3, 8, 2)
    torch.testing.assert_close(head(correlation), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture
def cpu_kernels_restored():
    yield
    dhe.set_cpu_kernels("auto")


@pytest.mark.parametrize("kernels", ["aten", "onednn"])
def test_head_inference_kernels_match_torch_transformer_encoder(kernels, cpu_kernels_restored):
    """Without gradients the head may run its linears as oneDNN matmuls: the same outputs as the modules, to the
    rounding of a different GEMM (same tolerance as with gradients)."""
    torch.manual_seed(0)
    head = HomographyRegression(resize=(96, 64)).eval()
    for parameter in head.parameters():
        parameter.data.normal_(0, 0.05)
    correlation = compute_similarity(torch.randn(3, 16, 6, 4), torch.randn(3, 16, 6, 4))
    dhe.set_cpu_kernels(kernels)
    with torch.inference_mode():
        sequence = correlation.reshape(3, 24, 24).transpose(1, 2) + head.pe.transpose(1, 2)
        encoded = head.encoder(sequence)
        expected = head.linear((head.encoder2(encoded) + encoded).transpose(1, 2).reshape(3, -1)).reshape(3, 8, 2)
        torch.testing.assert_close(head(correlation), expected, atol=1e-5, rtol=1e-5)
        # bf16 autocast: both kernels cast the linears' inputs and weights to bf16 and keep the residual stream
        # fp32; they differ from fp32 by bf16 rounding (8 bits of mantissa: ~4e-3 relative per rounding, a few
        # roundings deep; 1.4e-3 measured), well below the spread of the points (std ~0.15 here).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp_points = head(correlation)
        torch.testing.assert_close(amp_points.float(), expected, atol=1e-2, rtol=1e-2)


def test_cpu_kernels_choice(cpu_kernels_restored):
    dhe.set_cpu_kernels("aten")
    assert dhe.cpu_kernels() == "aten"
    dhe.set_cpu_kernels("onednn")
    assert dhe.cpu_kernels() == ("onednn" if torch.backends.mkldnn.is_available() else "aten")
    with pytest.raises(ValueError, match="cpu kernels 'mkl'"):
        dhe.set_cpu_kernels("mkl")


def test_cached_bf16_weights_follow_loaded_weights(cpu_kernels_restored):
    """The oneDNN bf16 path caches the casts of the weights; loading other weights must invalidate them."""
    dhe.set_cpu_kernels("onednn")
    torch.manual_seed(0)
    head, other = HomographyRegression(resize=(64, 64)).eval(), HomographyRegression(resize=(64, 64)).eval()
    correlation = compute_similarity(torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        head(correlation)
        expected = other(correlation)
    head.load_state_dict(other.state_dict())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(head(correlation), expected)
