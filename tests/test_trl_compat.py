"""TRL drop-in: TRL 0.23's public AlignProp API used the way its own tests and example script use it (written here,
not copied), against alignprop_core.trl_compat."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from alignprop_core.errors import ConfigError
from alignprop_core.trl_compat import (
    AlignPropConfig,
    AlignPropTrainer,
    DefaultDDPOStableDiffusionPipeline,
    aesthetic_scorer,
)


def trl_style_reward(images, prompts, metadata):
    """A reward the TRL way: ``(scores [B], metadata)``."""
    return images.mean(dim=(1, 2, 3)), {}


def placeholder_scorer(images, prompts, metadata):
    """What TRL's own tests pass: one random score for the batch, no gradient."""
    return torch.randn(1) * 3.0, {}


def animal_prompt():
    return np.random.choice(["cat", "dog", "horse"]), {}


def trl_test_config(tmp_path, **overrides):
    """TRL's test set-up config (its field names), with a tiny step count and a private output folder."""
    values = dict(num_epochs=2, train_gradient_accumulation_steps=1, train_batch_size=2, truncated_backprop_rand=False,
                  mixed_precision=None, save_freq=1000000, sample_num_steps=3, truncated_backprop_timestep=1,
                  eval_num_samples=0, output_dir=str(tmp_path / "out"))
    values.update(overrides)
    return AlignPropConfig(**values)


@pytest.fixture
def trl_pipelines(tiny_sd_path):  # fresh per test, as TRL's setUp builds them: a trainer adds its LoRA to the UNet
    return {use_lora: DefaultDDPOStableDiffusionPipeline(str(tiny_sd_path), pretrained_model_revision="main",
                                                         use_lora=use_lora) for use_lora in (True, False)}


def test_trl_field_names_construct_and_translate(tmp_path):
    config = trl_test_config(tmp_path).validate()
    assert (config.truncation, config.truncation_k, config.mixed_precision) == ("fixed", 2, "no")
    rand = AlignPropConfig(truncated_backprop_rand=True, truncated_rand_backprop_minmax=(10, 40)).validate()
    assert (rand.truncation, rand.truncation_min, rand.truncation_max) == ("uniform", 10, 40)
    assert AlignPropConfig(truncated_backprop_rand="false").truncation == "fixed"  # a string is parsed, not truthy
    assert AlignPropConfig.from_dict(rand.to_dict()).truncation_min == 10  # both spellings round-trip consistently


@pytest.mark.parametrize("values,message", [
    ({"truncated_backprop_rand": False, "truncated_backprop_timestep": 50},
     "truncated_backprop_timestep: got 50, allowed: an integer in [0, sample_num_steps - 1 = 49]"),
    ({"truncated_backprop_rand": True, "truncated_rand_backprop_minmax": [50, 50]},
     "truncated_rand_backprop_minmax: got [50, 50], allowed: [a, b] with 0 <= a <= b and a < sample_num_steps=50"),
    ({"truncated_backprop_rand": False, "truncation": "fixed", "truncation_k": 3},
     "truncation_k: got 3, but TRL's truncated_backprop_rand=False means truncation_k=1"),
    ({"truncated_backprop_rand": "maybe"}, "truncated_backprop_rand: expected bool, got 'maybe'"),
    ({"mixed_precision": "fp8"}, "mixed_precision: got 'fp8'"),
    ({"project_kwargs": {"project_dir": "a"}, "output_dir": "b"}, "project_kwargs.project_dir: got 'a' but output_dir"),
    ({"project_kwargs": {"total_limit": 2}, "num_checkpoint_limit": 3}, "num_checkpoint_limit: got 3, but"),
    ({"project_kwargs": {"iteration": 3}}, "project_kwargs: unknown key 'iteration'"),
    ({"accelerator_kwargs": {"mixed_precision": "no"}}, "accelerator_kwargs: 'mixed_precision' is set by the config"),
    ({"accelerator_kwargs": {"cpuu": True}}, "accelerator_kwargs: unknown key 'cpuu' (did you mean 'cpu'?)"),
])
def test_inconsistent_or_bad_trl_values_are_one_line_errors(values, message):
    with pytest.raises(ConfigError) as info:
        AlignPropConfig(**values).validate()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_hf_argument_parser_reads_trls_example_flags():
    from transformers import HfArgumentParser

    @dataclass
    class ScriptArguments:  # the fields TRL's example script declares itself
        pretrained_model: str = field(default="some/model", metadata={"help": "model"})
        pretrained_revision: str = field(default="main", metadata={"help": "revision"})
        use_lora: bool = field(default=True, metadata={"help": "LoRA or not"})

    parser = HfArgumentParser((ScriptArguments, AlignPropConfig))
    script_args, config = parser.parse_args_into_dataclasses(
        ["--num_epochs", "20", "--train_gradient_accumulation_steps", "4", "--sample_num_steps", "50",
         "--train_batch_size", "8", "--truncated_backprop_rand", "false", "--truncated_backprop_timestep", "45",
         "--use_lora", "false", "--mixed_precision", "no"])
    assert script_args.use_lora is False and config.use_lora is True  # the script's flag, not ours
    assert (config.num_epochs, config.train_batch_size, config.truncation, config.truncation_k) == (20, 8, "fixed", 5)
    # TRL's example then sets project_kwargs on the parsed config: project_dir becomes output_dir
    config.project_kwargs = {"logging_dir": "./logs", "automatic_checkpoint_naming": True, "total_limit": 5,
                             "project_dir": "./save"}
    config.validate()
    assert (config.output_dir, config.num_checkpoint_limit, config.tracker_logging_dir) == ("./save", 5, "./logs")
    assert AlignPropConfig().validate().negative_prompts is None  # the parser did not change the class's types


@pytest.mark.parametrize("use_lora", [True, False])
def test_generate_samples_and_loss_as_trls_tests_call_them(use_lora, trl_pipelines, tmp_path):
    trainer = AlignPropTrainer(trl_test_config(tmp_path), placeholder_scorer, animal_prompt, trl_pipelines[use_lora])
    assert trainer.use_lora is use_lora
    with_grad = trainer._generate_samples(2, with_grad=True)
    assert set(with_grad) == {"images", "prompts", "prompt_metadata"}
    assert tuple(with_grad["images"].shape) == (2, 3, 128, 128) and with_grad["images"].requires_grad
    without = trainer._generate_samples(2, with_grad=False, prompts=["a cat", "a dog"])
    assert not without["images"].requires_grad and without["prompts"] == ["a cat", "a dog"]
    loss = trainer.calculate_loss(trainer.compute_rewards(with_grad))
    assert torch.isfinite(loss)
    assert not Path(tmp_path / "out").exists()  # building trainers and sampling writes nothing
    with pytest.raises(Exception, match="reward 'reward' returned shape \\[1\\], expected \\[2\\]"):
        trainer.train()  # the placeholder scorer is refused once it would be trained on, before anything is written
    assert not Path(tmp_path / "out").exists()


def test_trl_example_callables_train_and_checkpoint_into_project_dir(tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logged = []

    def image_outputs_logger(image_pair_data, global_step, accelerate_logger):  # TRL's example hook, in spirit
        result = {prompt: image.unsqueeze(0).float()
                  for prompt, image in zip(image_pair_data["prompts"], image_pair_data["images"][:4])}
        accelerate_logger.log_images(result, step=global_step)
        logged.append(global_step)

    config = trl_test_config(tmp_path, output_dir=None, save_freq=1, num_epochs=3, truncated_backprop_rand=True,
                             truncated_rand_backprop_minmax=(0, 3), truncated_backprop_timestep=None)
    config.project_kwargs = {"logging_dir": "./logs", "automatic_checkpoint_naming": True, "total_limit": 2,
                             "project_dir": "./save"}
    pipeline = DefaultDDPOStableDiffusionPipeline(str(tiny_sd_path), use_lora=True)
    trainer = AlignPropTrainer(config, trl_style_reward, animal_prompt, pipeline,
                               image_samples_hook=image_outputs_logger)
    assert config.output_dir == "./save"  # validated in place, as TRL's example's save_model(output_dir) expects
    assert trainer.step(0, 0) == 1  # TRL's step: one optimizer update, returns the next global step
    trainer.train()
    trainer.save_model(trainer.config.output_dir)
    save = tmp_path / "save"
    assert [p.name for p in sorted((save / "checkpoints").iterdir())] == ["checkpoint-2", "checkpoint-3"]
    assert (save / "pytorch_lora_weights.safetensors").is_file() and logged == [1, 2, 3]
    assert list((save / "images" / "hook").glob("step-000003/*.png"))  # no tracker: the hook's images are kept

    resumed_config = trl_test_config(tmp_path, output_dir=str(save), num_epochs=4, resume_from="latest",
                                     truncated_backprop_rand=True, truncated_rand_backprop_minmax=(0, 3),
                                     truncated_backprop_timestep=None, save_freq=1)
    resumed = AlignPropTrainer(resumed_config, trl_style_reward, animal_prompt,
                               DefaultDDPOStableDiffusionPipeline(str(tiny_sd_path)))
    assert resumed.state.global_step == 3
    assert resumed.train(epochs=4).global_step == 4


def test_full_unet_fine_tuning_exports_resumes_and_loads(tiny_sd_path, tiny_config, tmp_path):
    from diffusers import UNet2DConditionModel

    from alignprop_core.checkpoints import list_checkpoints

    straight = AlignPropTrainer(tiny_config(use_lora=False, num_epochs=3, save_freq=1, output_dir=str(tmp_path / "a")))
    before = [p.detach().clone() for p in straight.trainable_params]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in straight.unet.parameters())
    straight.train()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, straight.trainable_params))
    assert changed > len(before) // 2  # every kind of UNet weight trains, not only attention projections
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "a", subfolder="unet")
    trained = straight.accelerator.unwrap_model(straight.unet).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in exported.state_dict().items())

    first = AlignPropTrainer(tiny_config(use_lora=False, num_epochs=2, save_freq=1, output_dir=str(tmp_path / "b")))
    first.train()
    assert (list_checkpoints(tmp_path / "b")[-1] / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    resumed = AlignPropTrainer(tiny_config(use_lora=False, num_epochs=3, resume_from="latest",
                                           output_dir=str(tmp_path / "b")))
    resumed.train()
    assert all(torch.equal(a, b) for a, b in zip(resumed.trainable_params, straight.trainable_params))
    with pytest.raises(ConfigError, match="was trained with use_lora=False, this run has use_lora=True"):
        AlignPropTrainer(tiny_config(num_epochs=4, resume_from="latest", output_dir=str(tmp_path / "b")))


def test_aesthetic_scorer_from_a_local_folder_is_frozen_and_differentiable(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2),
                                vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=224, patch_size=32),
                                projection_dim=16))
    clip.save_pretrained(tmp_path)
    dims = [16, 32, 8, 8, 4, 1]
    head = {}
    for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        head[f"layers.{index}.weight"] = torch.randn(d_out, d_in)
        head[f"layers.{index}.bias"] = torch.randn(d_out)
    torch.save(head, tmp_path / "aesthetic-model.pth")
    scorer = aesthetic_scorer(str(tmp_path), "aesthetic-model.pth")
    images = torch.rand(2, 3, 96, 128, requires_grad=True)
    scores, metadata = scorer(images, ("a", "b"), ({}, {}))
    assert scores.shape == (2,) and metadata == {}
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in scorer.parameters())
    with pytest.raises(Exception, match="has no 'missing.pth'"):
        aesthetic_scorer(str(tmp_path), "missing.pth")


def test_step_works_without_train_and_without_a_hook(trl_pipelines, tmp_path):
    trainer = AlignPropTrainer(trl_test_config(tmp_path), trl_style_reward, animal_prompt, trl_pipelines[True])
    global_step = 0
    for epoch in range(2):  # a TRL-style loop
        global_step = trainer.step(epoch, global_step)
    assert global_step == 2 and trainer.state.global_step == 2
    rows = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2


def test_a_changed_step_count_retranslates_trl_truncation(tmp_path):
    config = trl_test_config(tmp_path).validate()  # t=1 of 3 steps: K=2
    config.sample_num_steps = 10
    assert config.validate().truncation_k == 9  # the earlier translation is not mistaken for the user's value


def test_one_pipeline_for_two_lora_trainers_is_a_clear_error(trl_pipelines, tmp_path):
    AlignPropTrainer(trl_test_config(tmp_path), trl_style_reward, animal_prompt, trl_pipelines[True])
    with pytest.raises(ConfigError, match="already has a LoRA adapter .* its own freshly loaded pipeline"):
        AlignPropTrainer(trl_test_config(tmp_path), trl_style_reward, animal_prompt, trl_pipelines[True])
