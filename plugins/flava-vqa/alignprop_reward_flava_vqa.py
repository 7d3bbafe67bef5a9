"""FLAVA-VQA: a differentiable VQA-style reward from FLAVA's pretraining heads, for alignprop.

FLAVA (``facebook/flava-full``, transformers ``FlavaForPreTraining``) has no VQA head. This reward scores how well
an image answers the questions a prompt source attaches to each prompt (``metadata = {"questions": [...],
"answers": [...]}``, e.g. ddpo-pytorch's ``counting`` source), with one of two scores:

``itm`` (default)
    For each question ``q`` with answer ``a``: the image-text-matching head's match probability
    ``softmax(itm_logits(image, f"{q} {a}"))[1]``; the sample's score is the mean over its questions (in [0, 1]).
``answer_likelihood``
    For each question: the text ``[CLS] q [MASK]*len(a) [SEP]`` is encoded with the image; the multimodal
    masked-LM head (``mmm_text_head``) gives the log-probability of each answer token at its masked position;
    the pair score is the mean over the answer tokens, the sample's score the mean over its questions (<= 0).

A sample without questions is scored on its prompt: ``itm`` uses the prompt as the text; ``answer_likelihood``
treats the prompt as the answer to an empty question (all prompt tokens masked at once).

The image path is FLAVA's own: image encoder -> last hidden states -> ``image_to_mm_projection``, text encoder
-> last hidden states -> ``text_to_mm_projection``, concatenated into the multimodal encoder (with its CLS token),
exactly what ``FlavaForPreTraining.forward`` computes for ``itm_logits`` / ``mmm_text_logits``, but without the
unimodal heads, the contrastive head and the image codebook. Text states do not depend on the image and are
cached per text under ``torch.no_grad``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from alignprop_core import plugin_api as api

DEFAULT_MODEL = "facebook/flava-full"
OWNER = "reward 'flava_vqa'"
SCORES = ("itm", "answer_likelihood")
ITM_MATCH_INDEX = 1  # FlavaForPreTraining's itm labels: 1 = the text matches the image


def _field(obj: Any, key: str) -> Any:
    """``obj[key]`` for dicts, ``obj.key`` for transformers' SizeDict and friends, None if absent."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _is_bicubic(resample: Any) -> bool:
    if resample is None:
        return True
    name = getattr(resample, "name", None) or getattr(resample, "value", None)
    if isinstance(name, str):
        return name.lower() == "bicubic"
    return int(resample) == 3  # PIL.Image.BICUBIC


def _load(model: str) -> tuple[Any, Any]:
    """``FlavaForPreTraining`` (without the image codebook, which no score needs) and ``FlavaProcessor``."""
    from transformers import FlavaForPreTraining, FlavaProcessor

    class FlavaWithoutCodebook(FlavaForPreTraining):  # checkpoints carry the codebook: skip it without a report
        _keys_to_ignore_on_load_unexpected = [r"^image_codebook\."]

    local = os.path.isdir(model)  # ``model`` is an existing folder or a valid hub id (checked by from_options)
    path = model
    try:
        flava = FlavaWithoutCodebook.from_pretrained(path, init_codebook=False, local_files_only=local)
        processor = FlavaProcessor.from_pretrained(path, local_files_only=local)
    except Exception as exc:
        where = f"local folder '{path}'" if local else f"hub id '{path}'"
        raise api.AlignPropError(
            f"flava_vqa: could not load FlavaForPreTraining and FlavaProcessor from {where} "
            f"({type(exc).__name__}); set the reward option 'model' to a local folder saved with save_pretrained "
            "(model and processor)"
        ) from exc
    return flava, processor


class FlavaVQAReward(api.FrozenReward):
    """``reward(images, prompts, metadata) -> Tensor[B]``: FLAVA VQA-style score of each image (see module doc)."""

    def __init__(self, model: torch.nn.Module, processor: Any, score: str = "itm"):
        super().__init__()
        if score not in SCORES:
            raise api.AlignPropError(
                f"flava_vqa: unknown score '{score}'; set the option 'score' to one of {', '.join(SCORES)}"
            )
        self.model = model
        self.tokenizer = processor.tokenizer
        self.score = score
        self._configure_preprocessing(processor.image_processor)
        text_config = model.config.text_config
        tokenizer_max = getattr(self.tokenizer, "model_max_length", None) or 512
        self.max_length = int(min(text_config.max_position_embeddings, tokenizer_max))
        self._text_cache: dict[tuple, tuple] = {}

    @classmethod
    def from_options(cls, model: str = DEFAULT_MODEL, score: str = "itm") -> "FlavaVQAReward":
        """Build the frozen reward. ``model``: hub id or local folder with a ``FlavaForPreTraining`` and its
        ``FlavaProcessor``; ``score``: ``itm`` (match probability) or ``answer_likelihood``."""
        score = api.choice(OWNER, "score", score, SCORES)
        model = api.folder_or_hub_id(OWNER, "model", model, what="model folder",
                                     allowed="a hub id such as facebook/flava-full or a local FlavaForPreTraining "
                                     "folder (config, weights and processor files)")
        flava, processor = _load(model)
        return cls(flava, processor, score)

    # ------------------------------------------------------------------------------------------ preprocess
    def _configure_preprocessing(self, ip: Any) -> None:
        """Mirror the processor's settings (read from the object: ``size: 224`` already means 224x224 there)."""
        do_resize = _field(ip, "do_resize") is not False
        size = {k: _field(_field(ip, "size"), k) for k in ("shortest_edge", "height", "width")}
        if do_resize and not _is_bicubic(_field(ip, "resample")):
            raise api.AlignPropError(
                f"flava_vqa: the image processor resamples with {_field(ip, 'resample')!r}; only bicubic is "
                "supported (FLAVA's own setting); fix 'resample' in the model folder's processor config"
            )
        if do_resize and not (size["shortest_edge"] or (size["height"] and size["width"])):
            raise api.AlignPropError(
                f"flava_vqa: unsupported image processor size {_field(ip, 'size')!r}; expected height/width or "
                "shortest_edge"
            )
        crop = _field(ip, "crop_size") if _field(ip, "do_center_crop") else None
        self.image_mean = tuple(float(v) for v in (_field(ip, "image_mean") or (0.0, 0.0, 0.0)))
        self.image_std = tuple(float(v) for v in (_field(ip, "image_std") or (1.0, 1.0, 1.0)))
        self.preprocessing = {
            "do_resize": do_resize, "size": size, "do_center_crop": crop is not None,
            "crop_size": {k: _field(crop, k) for k in ("height", "width")},
            "do_normalize": _field(ip, "do_normalize") is not False,
            "image_mean": self.image_mean, "image_std": self.image_std,
        }

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable version of the FLAVA image processor (images in [0, 1] = after its 1/255 rescale)."""
        return api.image_processor_preprocess(images, self.preprocessing)

    # ---------------------------------------------------------------------------------------------- text
    def _pairs(self, prompts: list[str], metadata: list[dict] | None) -> list[list[tuple[str | None, str]]]:
        """Per sample, its (question, answer) pairs; ``[(None, prompt)]`` when it has no questions."""
        metadata = metadata if metadata is not None else [{}] * len(prompts)
        if len(metadata) != len(prompts):
            raise api.AlignPropError(f"flava_vqa: got {len(prompts)} prompts but {len(metadata)} metadata dicts")
        pairs = []
        for prompt, meta in zip(prompts, metadata):
            meta = meta or {}
            questions, answers = meta.get("questions") or [], meta.get("answers") or []
            questions = [questions] if isinstance(questions, str) else list(questions)
            answers = [answers] if isinstance(answers, str) else list(answers)
            if len(questions) != len(answers):
                raise api.AlignPropError(
                    f"flava_vqa: prompt '{prompt}' has {len(questions)} questions but {len(answers)} answers in its "
                    "metadata; the prompt source must give one answer per question"
                )
            if questions:
                pairs.append([(str(q), str(a)) for q, a in zip(questions, answers)])
            else:
                pairs.append([(None, str(prompt))])
        return pairs

    def _token_ids(self, question: str | None, answer: str) -> tuple[list[int], list[int], list[int]]:
        """Input ids, masked positions and target ids of one text for the selected score."""
        tok = self.tokenizer
        if self.score == "itm":
            text = answer if question is None else f"{question} {answer}"
            ids = tok(text, truncation=True, max_length=self.max_length)["input_ids"]
            return list(ids), [], []
        q_ids = tok(question, add_special_tokens=False)["input_ids"] if question else []
        a_ids = tok(answer, add_special_tokens=False)["input_ids"][: self.max_length - 2]
        if not a_ids:
            raise api.AlignPropError(f"flava_vqa: answer '{answer}' tokenizes to nothing; give non-empty answers")
        q_ids = q_ids[: max(0, self.max_length - 2 - len(a_ids))]
        ids = [tok.cls_token_id, *q_ids, *([tok.mask_token_id] * len(a_ids)), tok.sep_token_id]
        positions = list(range(1 + len(q_ids), 1 + len(q_ids) + len(a_ids)))
        return ids, positions, list(a_ids)

    @torch.no_grad()
    def _encode_texts(self, keys: list[tuple[str | None, str]]) -> None:
        """Fill the cache with the multimodal-projected text states of every uncached (question, answer) key."""
        missing = [k for k in dict.fromkeys(keys) if (self.score, *k) not in self._text_cache]
        if not missing:
            return
        param = next(self.model.parameters())
        encoded = [self._token_ids(q, a) for q, a in missing]
        length = max(len(ids) for ids, _, _ in encoded)
        input_ids = torch.full((len(missing), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(missing), length), dtype=torch.long)
        for row, (ids, _, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        flava = self.model.flava
        out = flava.text_model(
            input_ids=input_ids.to(param.device),
            attention_mask=attention_mask.to(param.device),
            output_hidden_states=True,
            return_dict=True,
        )
        states = flava.text_to_mm_projection(out.hidden_states[-1])  # no final layernorm, as in FlavaModel
        for row, (key, (ids, positions, targets)) in enumerate(zip(missing, encoded)):
            self._text_cache[(self.score, *key)] = (states[row, : len(ids)], positions, targets)

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise api.AlignPropError(f"flava_vqa: expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise api.AlignPropError(f"flava_vqa: got {images.shape[0]} images but {len(prompts)} prompts")
        pairs = self._pairs(list(prompts), metadata)
        keys = [key for sample in pairs for key in sample]
        self._encode_texts(keys)

        param = next(self.model.parameters())
        device, dtype = param.device, param.dtype
        flava = self.model.flava
        pixels = self.preprocess(images.to(device=device, dtype=dtype))
        image_out = flava.image_model(pixel_values=pixels, output_hidden_states=True, return_dict=True)
        image_states = flava.image_to_mm_projection(image_out.hidden_states[-1])  # [B, 1 + patches, D]

        owner = torch.tensor([i for i, sample in enumerate(pairs) for _ in sample], device=device)
        cached = [self._text_cache[(self.score, *key)] for key in keys]
        length = max(states.shape[0] for states, _, _ in cached)
        text_states = image_states.new_zeros((len(keys), length, image_states.shape[-1]))
        text_mask = torch.zeros((len(keys), length), device=device, dtype=dtype)
        for row, (states, _, _) in enumerate(cached):
            text_states[row, : states.shape[0]] = states.to(device=device, dtype=dtype)
            text_mask[row, : states.shape[0]] = 1

        multimodal = flava.multimodal_model
        n_image = image_states.shape[1] + (1 if multimodal.use_cls_token else 0)
        attention_mask = torch.cat([text_mask.new_ones((len(keys), n_image)), text_mask], dim=1)
        hidden = torch.cat([image_states[owner], text_states], dim=1)
        mm = multimodal(hidden, attention_mask=attention_mask, return_dict=True).last_hidden_state

        if self.score == "itm":
            logits = self.model.itm_head(mm).float()
            pair_scores = logits.softmax(dim=-1)[:, ITM_MATCH_INDEX]
        else:
            text_part = mm[:, -length:]
            rows = torch.tensor([r for r, (_, pos, _) in enumerate(cached) for _ in pos], device=device)
            cols = torch.tensor([p for _, pos, _ in cached for p in pos], device=device)
            targets = torch.tensor([t for _, _, tgt in cached for t in tgt], device=device)
            log_probs = self.model.mmm_text_head(text_part[rows, cols]).float().log_softmax(dim=-1)
            token_scores = log_probs.gather(1, targets[:, None]).squeeze(1)
            sums = token_scores.new_zeros(len(keys)).index_add(0, rows, token_scores)
            counts = torch.tensor([len(pos) for _, pos, _ in cached], device=device, dtype=sums.dtype)
            pair_scores = sums / counts
        totals = pair_scores.new_zeros(len(pairs)).index_add(0, owner, pair_scores)
        counts = torch.tensor([len(sample) for sample in pairs], device=device, dtype=totals.dtype)
        return totals / counts


@api.hookimpl
def register_rewards(register):
    register(
        "flava_vqa",
        FlavaVQAReward.from_options,
        description="FLAVA VQA-style score: ITM match probability (or answer likelihood) of metadata questions/answers",
        details={"source": "facebook/flava-full",
                 "license": "BSD-3-Clause (facebook/flava-full)",
                 "scale": "probability in [0, 1] (itm) or mean answer log-likelihood <= 0 (answer_likelihood)",
                 "input_size": "224x224 (shortest side, centre crop)",
                 "suits": "any family; prompt alignment with questions/answers metadata (the counting source)"},
    )
