"""alignprop mix: the weighted LoRA soup is exact (checked against diffusers' own fuse_lora, not our formula)."""

import json

import pytest
import torch

from alignprop_core.errors import ConfigError
from alignprop_core.lora import LORA_WEIGHTS_NAME
from alignprop_core.mix import mix_loras


def make_lora(base_path, out, rank, alpha, targets, seed):
    """A LoRA with random non-zero factors on ``targets``, saved through alignprop's own exporter."""
    from diffusers import StableDiffusionPipeline

    from alignprop_core.lora import add_lora, save_lora

    pipe = StableDiffusionPipeline.from_pretrained(base_path, local_files_only=True)
    add_lora(pipe.unet, rank, alpha, targets)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    save_lora(pipe.unet, out)
    return out


@pytest.fixture(scope="module")
def two_loras(tiny_sd_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    # different ranks, alpha != rank, and partly different target modules
    a = make_lora(tiny_sd_path, root / "a", rank=4, alpha=8.0, targets=["to_q", "to_k", "to_v", "to_out.0"], seed=1)
    b = make_lora(tiny_sd_path, root / "b", rank=2, alpha=1.0, targets=["to_k", "to_v", "proj_in"], seed=2)
    return a, b


def load_pipe(tiny_sd_path, lora=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def merged_deltas(tiny_sd_path, lora, component="unet"):
    """Weight change of every weight after diffusers fuses the LoRA (its own scale handling)."""
    base = {k: v.clone() for k, v in getattr(load_pipe(tiny_sd_path), component).state_dict().items()}
    pipe = load_pipe(tiny_sd_path, lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = getattr(pipe, component).state_dict()
    return {k: fused[k] - base[k] for k in base}


def images(pipe):
    return pipe(["a cat", "a dog"], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


def assert_deltas_close(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(actual[key], expected[key], atol=1e-5), (key, (actual[key] - expected[key]).abs().max())


def test_weights_one_zero_reproduce_the_first_lora(two_loras, tiny_sd_path, tmp_path):
    a, b = two_loras
    out = tmp_path / "mix10"
    mix_loras([a, b], [1.0, 0.0], out)
    delta_a = merged_deltas(tiny_sd_path, a)
    assert sum(float(d.abs().sum()) for d in delta_a.values()) > 1.0  # the LoRA really changes the model
    assert_deltas_close(merged_deltas(tiny_sd_path, out), delta_a)
    assert torch.allclose(images(load_pipe(tiny_sd_path, out)), images(load_pipe(tiny_sd_path, a)), atol=1e-5)


def test_half_half_is_the_average_delta_over_different_modules(two_loras, tiny_sd_path, tmp_path):
    a, b = two_loras
    out = tmp_path / "mix55"
    file = mix_loras([a, b], [0.5, 0.5], out)
    assert file == out / LORA_WEIGHTS_NAME and file.is_file()
    delta_a, delta_b = merged_deltas(tiny_sd_path, a), merged_deltas(tiny_sd_path, b)
    expected = {k: 0.5 * delta_a[k] + 0.5 * delta_b[k] for k in delta_a}
    # proj_in is adapted only by b, to_q only by a, to_k/to_v by both: all must come out right
    for module in ("proj_in", "attn1.to_k"):  # conv and linear targets of b both load (exported consistently)
        assert any(module in k and d.abs().sum() > 0 for k, d in delta_b.items()), module
    assert_deltas_close(merged_deltas(tiny_sd_path, out), expected)
    info = json.loads((out / "alignprop_mix.json").read_text())
    assert info["weights"] == [0.5, 0.5] and info["rank"]["unet"] == [2, 4, 6]


def test_three_loras_and_negative_weights(two_loras, tiny_sd_path, tmp_path):
    a, b = two_loras
    c = make_lora(tiny_sd_path, tmp_path / "c", rank=3, alpha=3.0, targets=["to_q"], seed=3)
    out = tmp_path / "mix3"
    mix_loras([a, b, c], [0.7, -0.2, 0.5], out)
    deltas = [merged_deltas(tiny_sd_path, d) for d in (a, b, c)]
    expected = {k: 0.7 * deltas[0][k] - 0.2 * deltas[1][k] + 0.5 * deltas[2][k] for k in deltas[0]}
    assert_deltas_close(merged_deltas(tiny_sd_path, out), expected)


def test_text_encoder_loras_mix_with_unet_loras(two_loras, tiny_sd_path, tmp_path):
    """A text-encoder LoRA in diffusers' own export format (lora_linear_layer keys) mixes exactly too."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    encoder = StableDiffusionPipeline.from_pretrained(tiny_sd_path, local_files_only=True).text_encoder
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    inject_adapter_in_model(config, encoder)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(4)) * 0.2)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "te", text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder)),
        text_encoder_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    a, _ = two_loras
    mix_loras([tmp_path / "te", a], [0.3, 0.5], tmp_path / "mix")
    for lora, weight, component in ((tmp_path / "te", 0.3, "text_encoder"), (a, 0.5, "unet")):
        expected = {k: weight * d for k, d in merged_deltas(tiny_sd_path, lora, component).items()}
        assert sum(float(d.abs().sum()) for d in expected.values()) > 0.1
        assert_deltas_close(merged_deltas(tiny_sd_path, tmp_path / "mix", component), expected)


def test_mix_command_line_and_errors(two_loras, tmp_path, capsys):
    from alignprop_core.cli import main

    a, b = two_loras
    assert main(["mix", str(a), str(b), "--weights", "0.25", "0.75", "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / LORA_WEIGHTS_NAME).is_file()
    assert "load it with StableDiffusionPipeline.load_lora_weights" in capsys.readouterr().out
    assert main(["mix", str(a), str(b), "--weights", "1", "-o", str(tmp_path / "bad")]) == 2
    assert "error: --weights: got 1 weights for 2 LoRAs" in capsys.readouterr().err
    assert main(["mix", str(a), str(tmp_path / "missing"), "-o", str(tmp_path / "bad")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is one of the inputs"):
        mix_loras([a, b], None, a)


def test_an_sd_and_an_sdxl_lora_do_not_mix(two_loras, tmp_path):
    """Their shared modules (the mid block's cross-attention) take inputs of different widths."""
    from diffusers import StableDiffusionXLPipeline

    from alignprop_core.lora import add_lora, save_lora
    from alignprop_core.tiny import build_tiny_sdxl_pipeline

    unet = StableDiffusionXLPipeline.from_pretrained(build_tiny_sdxl_pipeline(tmp_path / "xl"),
                                                     local_files_only=True).unet
    add_lora(unet, 2, 2.0, ["to_q", "to_k", "to_v", "to_out.0"])
    save_lora(unet, tmp_path / "xl-lora", family="sdxl")
    a, _ = two_loras
    with pytest.raises(ConfigError, match=rf"cannot mix '{a}' and '{tmp_path / 'xl-lora'}': they adapt "
                       r"unet\.mid_block\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k with different shapes "
                       r"\(\[64, 32\] vs \[64, 64\]\)"):
        mix_loras([a, tmp_path / "xl-lora"], None, tmp_path / "mix")
    assert not (tmp_path / "mix").exists()


def test_mix_overwrites_a_lora_only_when_asked(two_loras, tmp_path, capsys):
    from alignprop_core.cli import main

    a, b = two_loras
    out = tmp_path / "soup"
    assert main(["mix", str(a), str(b), "-o", str(out)]) == 0
    first = (out / LORA_WEIGHTS_NAME).read_bytes()
    assert main(["mix", str(a), str(b), "--weights", "1", "0", "-o", str(out)]) == 2
    assert "already holds a LoRA" in capsys.readouterr().err
    assert (out / LORA_WEIGHTS_NAME).read_bytes() == first
    assert main(["mix", str(a), str(b), "--weights", "1", "0", "-o", str(out), "--overwrite"]) == 0
    assert (out / LORA_WEIGHTS_NAME).read_bytes() != first
    assert json.loads((out / "alignprop_mix.json").read_text())["weights"] == [1.0, 0.0]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("mine")
    assert main(["mix", str(a), "-o", str(tmp_path / "notes")]) == 0  # a folder without a LoRA is fine
    assert (tmp_path / "notes" / "readme.txt").read_text() == "mine"
