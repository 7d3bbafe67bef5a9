"""Tests of the ``mps`` reward on a tiny random-init MPS of the real architecture (transformers CLIPModel with hidden
size 32 and 2 layers, plus a 2-layer condition cross-attention module), saved as a state dict in the reference
layout and loaded back through the plugin's own loader.

The parity reference is the MPS repository's scoring code path (``infer_one_sample`` of
``eval_overall_mps_on_hpdv2.py`` / ``eval_overall_mps_on_imagereward.py`` with ``trainer/models/cross_modeling.py``,
Kwai-Kolors/MPS at be9027f), reproduced below from that published source as plain tensor operations on the state
dict: PIL images through transformers' PIL CLIPImageProcessor, one (image, prompt) at a time. A second, optional
reference is imscore 0.0.11's port (its XCLIPModel / CrossModel classes with the same weights), skipped when
imscore is not installed.

Run: cd /work/main && PYTHONPATH=/work/main .venv/bin/python -m pytest plugins/mps -q --import-mode=importlib
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignprop_core import plugins
from alignprop_core.plugin_api import AlignPropError, PluginError

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night",
           "a very long prompt " + "with many many words " * 12]  # > 77 tokens: truncated
LOGIT_SCALE = 4.6052  # exp = 100, as in trained CLIP / MPS
DIM, LAYERS, HEADS, DIM_HEAD, FF_INNER = 32, 2, 2, 16, 128  # the real module: 1024, 4, 16, 64, 4096
CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
             "instance, texture, quantity, attributes, position, number, location, word, things.")  # the MPS README


# ------------------------------------------------------------------------------------------ tiny checkpoint
def cross_state_dict(seed: int = 1, dim: int = DIM) -> dict[str, torch.Tensor]:
    """Random weights of ``Cross_model(dim, layer_num=LAYERS, heads=HEADS, dim_head=DIM_HEAD)`` under the key
    names and shapes of the reference module (``cross_model.layers.{i}.{0: CrossAttention, 1:
    ParallelTransformerBlock}.fn.*``), written from cross_modeling.py, not from our module. Weights ~ 1/sqrt(fan_in)
    so the module changes the image token a lot (a wrong cross module cannot pass for a right one)."""
    g = torch.Generator().manual_seed(seed)

    def w(out_features, in_features):
        return torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features)

    sd = {}
    for i in range(LAYERS):
        c, p = f"cross_model.layers.{i}.0.fn.", f"cross_model.layers.{i}.1.fn."
        sd.update({
            c + "norm.weight": 1 + 0.2 * torch.randn(dim, generator=g), c + "norm.bias": torch.zeros(dim),
            c + "to_q.weight": w(HEADS * DIM_HEAD, dim), c + "to_kv.weight": w(2 * DIM_HEAD, dim),
            c + "to_out.weight": w(dim, HEADS * DIM_HEAD),
            c + "ff.0.weight": w(2 * FF_INNER, dim), c + "ff.2.weight": w(dim, FF_INNER),
            p + "norm.weight": 1 + 0.2 * torch.randn(dim, generator=g), p + "norm.bias": torch.zeros(dim),
            p + "rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, DIM_HEAD, 2).float() / DIM_HEAD)),
            p + "fused_attn_ff_proj.weight": w(HEADS * DIM_HEAD + 2 * DIM_HEAD + 2 * FF_INNER, dim),
            p + "attn_out.weight": w(dim, HEADS * DIM_HEAD), p + "ff_out.1.weight": w(dim, FF_INNER),
        })
    return sd


def save_file(sd, path):
    from safetensors.torch import save_file as save

    save({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, helpers):
    """The tiny CLIP + processor folder, the MPS state dict and the checkpoint files it comes in."""
    from transformers import CLIPModel

    root = tmp_path_factory.mktemp("mps")
    clip_dir, _ = helpers.save_tiny_clip(root / "clip", projection_dim=DIM, logit_scale_init_value=LOGIT_SCALE)
    clip = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():  # token identity must dominate the (random) text features, or no token is ever masked
        clip.text_model.embeddings.token_embedding.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(5))
    sd = {f"model.{k}": v.clone() for k, v in clip.state_dict().items()}
    sd.update(cross_state_dict())
    # a state dict saved from the pickled module under transformers 4.27 also has the position_ids buffers
    legacy = {**sd, "model.text_model.embeddings.position_ids": torch.arange(77)[None],
              "model.vision_model.embeddings.position_ids": torch.arange(50)[None]}
    paths = {"pth": root / "mps_overall_state_dict.pth", "safetensors": root / "mps_overall.safetensors",
             "imscore": root / "model.safetensors", "ddp": root / "ddp.pt"}
    torch.save(legacy, paths["pth"])
    save_file(sd, paths["safetensors"])
    save_file({f"mps.{k}": v for k, v in sd.items()}, paths["imscore"])  # RE-N-Y/mpsv1 (PyTorchModelHubMixin)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, paths["ddp"])
    return {"root": root, "clip": clip_dir, "sd": sd, "paths": paths}


def build(tiny, kind="pth", **options):
    return plugins.build("reward", "mps", {"checkpoint": str(tiny["paths"][kind]), "processor": tiny["clip"],
                                           **options})


@pytest.fixture(scope="module")
def reward(tiny):
    return build(tiny)


# ------------------------------------------------------------------- reference: the MPS repo's scoring path
def ref_cross_model(sd, x, context, mask):
    """Cross_model.forward of cross_modeling.py on the state dict: per layer, Residual(CrossAttention) with the
    additive ``mask`` [B, N, L] then Residual(ParallelTransformerBlock), multi-query, rotary, SwiGLU."""
    def layer_norm(t, prefix):
        return F.layer_norm(t, t.shape[-1:], sd[prefix + "norm.weight"], sd[prefix + "norm.bias"])

    def swiglu(t):
        t, gate = t.chunk(2, dim=-1)
        return F.silu(gate) * t

    def rotate_half(t):
        t1, t2 = t.reshape(*t.shape[:-1], 2, t.shape[-1] // 2).unbind(dim=-2)
        return torch.cat((-t2, t1), dim=-1)

    scale = DIM_HEAD ** -0.5
    for i in range(LAYERS):
        c, p = f"cross_model.layers.{i}.0.fn.", f"cross_model.layers.{i}.1.fn."
        b, n, _ = x.shape
        h = layer_norm(x, c)
        q = (h @ sd[c + "to_q.weight"].T).reshape(b, n, HEADS, DIM_HEAD).permute(0, 2, 1, 3) * scale
        k, v = (context @ sd[c + "to_kv.weight"].T).chunk(2, dim=-1)
        sim = torch.einsum("bhid,bjd->bhij", q, k) + mask.unsqueeze(1).repeat(1, HEADS, 1, 1)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).permute(0, 2, 1, 3).reshape(b, n, -1) @ sd[c + "to_out.weight"].T
        x = x + out + swiglu(h @ sd[c + "ff.0.weight"].T) @ sd[c + "ff.2.weight"].T

        h = layer_norm(x, p)
        q, k, v, ff = (h @ sd[p + "fused_attn_ff_proj.weight"].T).split(
            (HEADS * DIM_HEAD, DIM_HEAD, DIM_HEAD, 2 * FF_INNER), dim=-1)
        q = q.reshape(b, n, HEADS, DIM_HEAD).permute(0, 2, 1, 3)
        inv_freq = sd[p + "rotary_emb.inv_freq"]
        freqs = torch.einsum("i,j->ij", torch.arange(n, dtype=inv_freq.dtype), inv_freq)
        pos = torch.cat((freqs, freqs), dim=-1)
        q = (q * pos.cos() + rotate_half(q) * pos.sin()) * scale
        k = k * pos.cos() + rotate_half(k) * pos.sin()
        sim = torch.einsum("bhid,bjd->bhij", q, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).permute(0, 2, 1, 3).reshape(b, n, -1)
        x = x + out @ sd[p + "attn_out.weight"].T + swiglu(ff) @ sd[p + "ff_out.1.weight"].T
    return x


@pytest.fixture(scope="module")
def reference(tiny, helpers):
    """``score(uint8 image, prompt, threshold=0.3) -> (score, pixel_values)``: infer_one_sample of the MPS eval
    scripts (XCLIPModel.get_text_features / get_image_features = projections of last_hidden_state and of the
    pooled EOS state; mask = where(sim / sim.max() > 0.3, 0, -inf); ``pixels.half()`` and ``mask.half()`` as there),
    on a plain transformers CLIPModel with the checkpoint's ``model.*`` weights and PIL preprocessing."""
    from PIL import Image
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    sd = tiny["sd"]
    clip = CLIPModel(CLIPConfig.from_pretrained(tiny["clip"])).eval()
    clip.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
    tokenizer = AutoTokenizer.from_pretrained(tiny["clip"])
    processor = helpers.pil_clip_processor(tiny["clip"])

    def tokenize(caption):
        return tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids

    def text_features(ids):
        out = clip.text_model(input_ids=ids)
        return clip.text_projection(out[0]), clip.text_projection(out[1])

    @torch.no_grad()
    def score(image, prompt, threshold=0.3, condition=CONDITION, half=True):
        pixel_values = processor(Image.fromarray(image).convert("RGB"), return_tensors="pt")["pixel_values"]
        text_input = tokenize(prompt)
        condition_batch = tokenize(condition).repeat(text_input.shape[0], 1)
        text_f, text_eos = text_features(text_input)
        pixels = pixel_values.half() if half else pixel_values
        image_f = clip.visual_projection(clip.vision_model(pixel_values=pixels)[0])
        condition_f, _ = text_features(condition_batch)
        sim = torch.einsum("bid,bjd->bji", text_f, condition_f)
        sim = torch.max(sim, dim=1, keepdim=True)[0]
        sim = sim / sim.max()
        mask = torch.where(sim > threshold, 0, float("-inf")).repeat(1, image_f.shape[1], 1)
        image_features = ref_cross_model(sd, image_f, text_f, mask.half() if half else mask)[:, 0, :]
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_eos = text_eos / text_eos.norm(dim=-1, keepdim=True)
        return (clip.logit_scale.exp() * text_eos @ image_features.T)[0, 0].item(), pixel_values

    return score


# --------------------------------------------------------------------------------------------------- tests
def test_entry_point_registers_mps():
    from alignprop_reward_mps import MPSReward

    registration = plugins.registrations("reward")["mps"]
    assert registration.package == "alignprop-reward-mps"
    assert registration.factory == MPSReward.from_options
    assert registration.plugin == "mps"
    assert dict(registration.details)["source"].startswith("RE-N-Y/mpsv1")


def test_condition_text_is_the_reference_one():
    from alignprop_reward_mps import OVERALL_CONDITION

    assert OVERALL_CONDITION == CONDITION


@pytest.mark.parametrize("kind", ["smooth", "noise"])
@pytest.mark.parametrize("shape", [(224, 224), (512, 512), (512, 768), (768, 512), (333, 517)],
                         ids=["224x224", "512x512", "768x512", "512x768", "517x333"])
def test_parity_with_the_reference_scoring_path(reward, reference, shape, kind, helpers):
    """Our tensor path vs the reference (PIL processor, eval-script scoring) on the same uint8 image, HxW = shape
    (ids are WxH); the preprocessed pixels directly; and our model on the reference's pixels (the model path alone).

    Measured (transformers 5.24, torch 2.13 CPU; tiny-model scores 7.8 .. 29.7 on the x100 scale): model alone vs
    the reference in float32 |diff| <= 1e-5; pixels identical at 224x224, else max 0.0153 (one uint8 level: PIL
    rounds after each resize pass), mean <= 0.0044; end to end vs the reference as published (float16 pixel cast,
    worth <= 0.0024 by itself) |diff| <= 0.0013 at 224x224 and <= 0.038 after a resize."""
    h, w = shape
    image = helpers.smooth_uint8(h, w, seed=h + 3 * w) if kind == "smooth" else helpers.uint8_image(h, w, seed=w)
    ref_score, ref_pixels = reference(image, PROMPTS[1])  # as published: pixels and mask cast to float16
    ref_fp32, _ = reference(image, PROMPTS[1], half=False)
    pixels = reward.preprocess(helpers.to_tensor(image))
    assert pixels.shape == ref_pixels.shape == (1, 3, 224, 224)
    if shape == (224, 224):
        assert torch.equal(pixels, ref_pixels)
    else:
        helpers.assert_within_one_uint8_level(pixels, ref_pixels, reward.preprocessing["image_mean"],
                                              reward.preprocessing["image_std"])
    with torch.no_grad():
        ours = reward(helpers.to_tensor(image), [PROMPTS[1]], [{}]).item()
        tokens, eos, bias = reward.text_inputs([PROMPTS[1]])
        query = reward.image_queries(ref_pixels, tokens, bias)
        on_ref_pixels = (reward.mps.model.logit_scale.exp() * F.cosine_similarity(query, eos)).item()
    assert abs(on_ref_pixels - ref_fp32) < 1e-4, (on_ref_pixels, ref_fp32)  # the model path alone
    assert abs(ours - ref_score) < (0.01 if shape == (224, 224) else 0.06), (ours, ref_score)


def test_batch_scores_each_pair_with_its_own_prompt(reward, reference, helpers):
    """A batch of 3 different prompts equals the reference one pair at a time (the mask is normalised per prompt,
    pairs are the diagonal); swapping the prompts changes the scores."""
    images = [helpers.uint8_image(224, 224, seed) for seed in range(3)]
    with torch.no_grad():
        got = reward(helpers.to_tensor(images), PROMPTS, [{}] * 3)
        swapped = reward(helpers.to_tensor(images), PROMPTS[::-1], [{}] * 3)
    assert got.shape == (3,) and got.dtype == torch.float32
    expected = torch.tensor([reference(i, p)[0] for i, p in zip(images, PROMPTS)])
    torch.testing.assert_close(got, expected, atol=0.01, rtol=0)  # 224x224: only the float16 pixel cast differs
    assert (swapped - got).abs()[[0, 2]].min() > 0.1


def test_condition_mask_is_exercised_and_follows_the_threshold(tiny, reward, reference, helpers):
    """The tiny prompts keep most tokens and mask some at 0.3; other thresholds (0.01 is the training forward's)
    and another condition text change the score, in the reference and in ours alike."""
    _, _, bias = reward.text_inputs(PROMPTS)
    kept = torch.isfinite(bias)
    assert kept.any(dim=-1).all() and not kept[1].all()  # prompt 1 has masked tokens
    image = helpers.uint8_image(224, 224, seed=11)
    condition = "hands, faces and nothing else"
    scores = {}
    for name, options, ref_options in (("0.3", {}, {}), ("0.01", {"mask_threshold": 0.01}, {"threshold": 0.01}),
                                       ("0.5", {"mask_threshold": 0.5}, {"threshold": 0.5}),
                                       ("condition", {"condition": condition}, {"condition": condition})):
        with torch.no_grad():
            scores[name] = (build(tiny, **options) if options else reward)(helpers.to_tensor(image), [PROMPTS[1]],
                                                                            [{}]).item()
        assert abs(scores[name] - reference(image, PROMPTS[1], **ref_options)[0]) < 0.01, name
    assert min(abs(scores["0.3"] - scores[name]) for name in ("0.01", "0.5", "condition")) > 0.05, scores


def test_checkpoint_formats_load_the_same_weights(tiny, reward):
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reward(images, PROMPTS[:2], [{}, {}])
        for kind in ("safetensors", "imscore", "ddp"):
            torch.testing.assert_close(build(tiny, kind)(images, PROMPTS[:2], [{}, {}]), expected)


def test_gradient_reaches_images_and_reward_stays_frozen(reward, helpers):
    images = torch.rand(2, 3, 96, 128, requires_grad=True)
    helpers.assert_gradient_reaches_images_never_weights(reward, images, PROMPTS[:2], [{}, {}])


def test_dtype_option_runs_the_model_in_bfloat16(tiny, reward):
    half = build(tiny, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    images = torch.rand(2, 3, 96, 128, requires_grad=True)
    scores = half(images, PROMPTS[:2], [{}, {}])
    assert scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():  # measured difference to float32: 0.125 (scores ~17-19 on a scale of 100)
        torch.testing.assert_close(scores.detach(), reward(images.detach(), PROMPTS[:2], [{}, {}]), atol=0.5, rtol=0)


def test_text_inputs_are_cached_per_prompt(tiny):
    reward = build(tiny)
    encoded: list[int] = []
    original = reward._encode_text

    def counting(ids):
        encoded.append(ids.shape[0])
        return original(ids)

    reward._encode_text = counting
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        first = reward(images, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [{}] * 3)
        assert encoded == [1, 2]  # the condition once, then the two distinct prompts
        second = reward(images, [PROMPTS[0], PROMPTS[1], PROMPTS[0]], [{}] * 3)
        assert encoded == [1, 2]
        reward(images, [PROMPTS[2], PROMPTS[1], PROMPTS[0]], [{}] * 3)
        assert encoded == [1, 2, 1]
    torch.testing.assert_close(first, second)


def test_two_step_training_with_the_mps_reward(tiny, train_two_steps):
    out = train_two_steps("mps", {"checkpoint": str(tiny["paths"]["safetensors"]), "processor": tiny["clip"]})
    assert (out / "pytorch_lora_weights.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- imscore
def test_parity_with_imscore_port(tiny, helpers):
    """imscore's MPS (built without its __init__, which downloads the laion model) on the same weights: its state
    dict accepts ours under 'mps.' (strict), and its score() path (training-forward threshold 0.01, torchvision
    tensor preprocessing) agrees with ours at mask_threshold 0.01. Measured on its own pixels |diff| <= 0.0015 (its
    float16 pixel cast); end to end 0.0015 at 224x224, 0.0007 at 512x768, and 0.21 at 333x517, where torchvision's
    CenterCrop puts the crop one pixel right of transformers' (and the reference's) floor offset."""
    model_module = pytest.importorskip("imscore.mps.model")
    cross_module = pytest.importorskip("imscore.mps.cross")
    import torchvision
    from transformers import AutoTokenizer

    inner = model_module.CLIPModel.__new__(model_module.CLIPModel)
    torch.nn.Module.__init__(inner)
    inner.model = model_module.XCLIPModel.from_pretrained(tiny["clip"])
    inner.model.text_model.eos_token_id = 2  # as MPS.__init__
    inner.cross_model = cross_module.CrossModel(dim=DIM, layer_num=LAYERS, dim_head=DIM_HEAD, heads=HEADS,
                                                ff_mult=FF_INNER // DIM)
    ims = model_module.MPS.__new__(model_module.MPS)
    torch.nn.Module.__init__(ims)
    ims.tokenizer = AutoTokenizer.from_pretrained(tiny["clip"])
    ims.condition = CONDITION
    ims.mps = inner
    ims.resize = torchvision.transforms.Resize(224, interpolation=3)
    ims.crop = torchvision.transforms.CenterCrop(224)
    ims.normalize = torchvision.transforms.Normalize(mean=[0.48145466, 0.4578275, 0.40821073],
                                                     std=[0.26862954, 0.26130258, 0.27577711])
    ims.load_state_dict({f"mps.{k}": v for k, v in tiny["sd"].items()}, strict=True)
    ims.eval()
    ours = build(tiny, "imscore", mask_threshold=0.01)
    for h, w in ((224, 224), (512, 768), (333, 517)):
        images = helpers.to_tensor(helpers.smooth_uint8(h, w, seed=h + w))
        with torch.no_grad():
            theirs = ims.score(images, [PROMPTS[1]]).item()
            mine = ours(images, [PROMPTS[1]], [{}]).item()
            tokens, eos, bias = ours.text_inputs([PROMPTS[1]])
            query = ours.image_queries(ims._process(images), tokens, bias)  # imscore's own pixels
            mine_on_their_pixels = (ours.mps.model.logit_scale.exp() * F.cosine_similarity(query, eos)).item()
        assert abs(theirs - mine_on_their_pixels) < 0.01, ((h, w), theirs, mine_on_their_pixels)
        if (h, w) != (333, 517):  # there torchvision's CenterCrop rounds the offset half-up (62, not 61): 0.21 off
            assert abs(theirs - mine) < (0.01 if h == w else 0.06), ((h, w), theirs, mine)


# ----------------------------------------------------------------------------------------------- errors
class WholeModule(torch.nn.Module):
    """Stands for the published MPS_overall_checkpoint.pth: a pickled nn.Module, not a state dict."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)


@pytest.fixture(scope="module")
def bad_checkpoints(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    sd = tiny["sd"]
    files = {}
    torch.save(WholeModule(), root / "whole.pth")
    files["whole"] = root / "whole.pth"
    (root / "junk.pth").write_bytes(bytes(range(256)) * 4)
    files["junk"] = root / "junk.pth"
    torch.save([torch.zeros(2)], root / "list.pth")
    files["list"] = root / "list.pth"
    torch.save({"model.a": torch.zeros(1), "cross_model.b": "text"}, root / "strings.pth")
    files["strings"] = root / "strings.pth"
    files["clip_only"] = save_file({k: v for k, v in sd.items() if k.startswith("model.")}, root / "clip.safetensors")
    files["no_to_q"] = save_file({k: v for k, v in sd.items() if not k.endswith("0.0.fn.to_q.weight")},
                                 root / "no_to_q.safetensors")
    files["no_to_out"] = save_file({k: v for k, v in sd.items() if not k.endswith("1.0.fn.to_out.weight")},
                                   root / "no_to_out.safetensors")
    wide = {**{k: v for k, v in sd.items() if k.startswith("model.")}, **cross_state_dict(dim=48)}
    files["wide_cross"] = save_file(wide, root / "wide.safetensors")
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    files["broken"] = root / "broken.safetensors"
    return files


@pytest.mark.parametrize("kind, parts", [
    ("whole", ["with torch.load(weights_only=True)", "pickles a Python object (class ", "WholeModule",
               "never unpickled", "docs/rewards/mps.md", "RE-N-Y/mpsv1"]),
    ("junk", ["(not a torch.save file of tensors only; point the option 'checkpoint' at an MPS state dict)"]),
    ("list", ["holds no state dict (expected a dict of tensors)"]),
    ("strings", ["holds no state dict"]),
    ("clip_only", ["is not an MPS state dict (no 'model.*' and 'cross_model.*' keys"]),
    ("no_to_q", ["lacks the MPS cross-attention weight 'cross_model.layers.0.0.fn.to_q.weight'"]),
    ("no_to_out", ["does not fit", "cross_model.layers.1.0.fn.to_out.weight"]),
    ("wide_cross", ["cross-attention width of 48 but the CLIP config of the processor has projection_dim 32"]),
    ("broken", ["cannot read checkpoint", "as safetensors"]),
])
def test_wrong_checkpoints_are_one_line_errors(tiny, bad_checkpoints, kind, parts):
    path = bad_checkpoints[kind]
    with pytest.raises(AlignPropError) as info:
        plugins.build("reward", "mps", {"checkpoint": str(path), "processor": tiny["clip"]})
    message = str(info.value)
    assert message.startswith("mps: ") and "\n" not in message and "weights_only=False" not in message
    assert str(path) in message
    for part in parts:
        assert part in message, (part, message)


def test_checkpoint_of_another_clip_size_is_a_shape_error(tiny, tmp_path, helpers):
    """The processor's CLIP config says hidden 48: the checkpoint's CLIP weights (hidden 32) do not fit."""
    import json

    folder = tmp_path / "wide-clip"
    helpers.save_tiny_clip(folder, projection_dim=DIM)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AlignPropError, match=r"does not fit MPS on the processor's CLIP config \(.*size mismatch"
                       ) as info:
        plugins.build("reward", "mps", {"checkpoint": str(tiny["paths"]["pth"]), "processor": str(folder)})
    assert "\n" not in str(info.value)


def test_missing_checkpoint_and_unreachable_hub_are_one_line_errors(tiny, tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "mps.safetensors"
    with pytest.raises(PluginError, match=r"checkpoint file '.*nope/mps.safetensors' does not exist; set the "
                       r"'checkpoint' option") as info:
        plugins.build("reward", "mps", {"checkpoint": str(missing), "processor": tiny["clip"]})
    assert "\n" not in str(info.value)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(AlignPropError, match=r"'model\.safetensors' from the Hugging Face hub repo 'RE-N-Y/mpsv1'.*"
                       r"set the reward option 'checkpoint'") as info:
        plugins.build("reward", "mps", {"processor": tiny["clip"]})
    assert "\n" not in str(info.value)


def test_processor_without_config_is_a_one_line_error(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PluginError, match=r"processor folder '.*empty' has no config.json \(the CLIP architecture\); "
                       r"set the 'processor' option") as info:
        plugins.build("reward", "mps", {"checkpoint": str(tiny["paths"]["pth"]), "processor": str(empty)})
    assert "\n" not in str(info.value)
    (empty / "config.json").write_text("{}")  # a config but no tokenizer files
    with pytest.raises(AlignPropError, match=r"could not load the tokenizer from local folder .*empty.*"
                       r"options\.processor") as info:
        plugins.build("reward", "mps", {"checkpoint": str(tiny["paths"]["pth"]), "processor": str(empty)})
    assert "\n" not in str(info.value)


def test_bad_inputs_are_clear_errors(reward):
    with pytest.raises(AlignPropError, match="2 images but 1 prompts"):
        reward(torch.rand(2, 3, 64, 64), ["one"], [{}])
    with pytest.raises(AlignPropError, match="a single string"):
        reward(torch.rand(1, 3, 64, 64), "one", [{}])
    with pytest.raises(AlignPropError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(1, 64, 64), ["one"], [{}])


@pytest.mark.parametrize("options, parts", [
    ({"checkpoint": 5}, ["option 'checkpoint' must be a local MPS state dict (.safetensors or .pth), or null for "
                         "RE-N-Y/mpsv1/model.safetensors", "got 5"]),
    ({"checkpoint": ""}, ["option 'checkpoint' must be", "got ''"]),
    ({"checkpoint": "{folder}"}, ["checkpoint file '{folder}' is a folder, not a file; set the 'checkpoint' option"]),
    ({"processor": None}, ["option 'processor' must be a hub id or a local copy of", "got None"]),
    ({"processor": "{file}"}, ["processor folder '{file}' is a file, not a folder; set the 'processor' option"]),
    ({"processor": "a b"}, ["got 'a b' (neither an existing folder nor a valid hub id)"]),
    ({"condition": ""}, ["option 'condition' must be a non-empty condition text, got ''"]),
    ({"condition": 3}, ["option 'condition' must be a non-empty condition text, got 3"]),
    ({"mask_threshold": "high"}, ["option 'mask_threshold' must be a number in [0, 1], got 'high'"]),
    ({"mask_threshold": -0.1}, ["option 'mask_threshold' must be a number in [0, 1], got -0.1"]),
    ({"mask_threshold": 1}, ["option 'mask_threshold' must be a number in [0, 1), got 1"]),
    ({"mask_threshold": True}, ["option 'mask_threshold' must be", "got True (a bool)"]),
    ({"dtype": "int8"}, ["option 'dtype' must be one of float32, float16, bfloat16 (or null), got 'int8'"]),
])
def test_bad_options_are_one_line_errors_before_loading(tiny, tmp_path, monkeypatch, options, parts):
    import alignprop_reward_mps as module

    def fail(*args, **kwargs):
        raise AssertionError("something was loaded before the options were checked")

    for name in ("_load", "_resolve_checkpoint", "_load_state_dict", "_build_model"):
        monkeypatch.setattr(module, name, fail)
    (tmp_path / "file").write_bytes(b"\x00")
    (tmp_path / "folder").mkdir()
    names = {"{file}": str(tmp_path / "file"), "{folder}": str(tmp_path / "folder")}

    def fill(value):
        if isinstance(value, str):
            for key, path in names.items():
                value = value.replace(key, path)
        return value

    with pytest.raises(PluginError) as info:
        plugins.build("reward", "mps", {"checkpoint": str(tiny["paths"]["pth"]), "processor": tiny["clip"],
                                        **{k: fill(v) for k, v in options.items()}})
    message = str(info.value)
    assert message.startswith("reward 'mps': ") and "\n" not in message
    for part in parts:
        assert fill(part) in message, (fill(part), message)
