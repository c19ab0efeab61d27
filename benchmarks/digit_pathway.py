"""Where does the digit pathway of a tiny pre-training run stall? Four measurements on a checkpoint.

`make train` names held-out digit images from their pixels in some seeds and stays at chance (0.1)
in others (issue 18). The pathway has two halves — the vision tower + projector must make image
features that tell digits apart, and the language model must read them at the position that
predicts the digit ("... This is a handwritten digit ▁" → "7") — so a failing run is diagnosed by
asking each half separately:

  (a) probe: are the projected image features informative? A logistic regression (scikit-learn)
      from the 4 projected <|patch|> vectors of an image (4 × hidden) to its digit, fitted on
      training images, scored on held-out ones — for the checkpoint and for a freshly initialised
      model (MetaP init, same seed: what a random encoder already separates).
  (b) use: does the language model read the image? Cross-entropy of the digit token (over the 10
      digit candidates and over the whole vocabulary) with each prompt's own image vs with the
      images shuffled across prompts; ln 10 = 2.303 is "predicts the marginal".
  (c) attention: the share of attention mass that the digit-predicting position puts on the
      <|patch|> positions, per layer (averaged over heads and prompts).
  (d) gradients: the norm of the digit-token loss gradient reaching the vision tower, the projector
      and the language model, and the RMS of the fused image features vs the token embeddings.
  (e) collapse: how much of the projected features' energy varies from image to image
      (var_share = E|f − mean f|² / E|f|², between_share: the part explained by the digit class)
      and the mean cosine between two different images' features. The language model reads them
      through RMSNorm, so features whose cosine is 0.9999 look the same to it, however well a
      standardised linear probe (a) still separates them.

    python benchmarks/digit_pathway.py RUN_DIR [--step N] [--json OUT.json]

RUN_DIR is a `herd train` output (its tokenizer.json and checkpoints/step_*); --step picks a
checkpoint (default: the final model in RUN_DIR).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load(run: Path, step: int | None):
    from herd.model.weights import load_model

    d = run if step is None else run / "checkpoints" / f"step_{step:06d}"
    return load_model(d).float()


def fresh(run: Path):
    """The same preset at initialisation (MetaP, the run's seed)."""
    from herd.model.llama4 import Llama4
    from herd.model.weights import ModelConfig
    from herd.train import metap

    cfg = json.loads((run / "train_config.json").read_text())
    torch.manual_seed(cfg["seed"])
    m = Llama4(ModelConfig.from_json(run))
    metap.init_metap(m, metap.MetaPConfig(base_width=cfg.get("metap_base_width", 256)),
                     generator=torch.Generator().manual_seed(cfg["seed"]))
    return m.float().eval()


@torch.no_grad()
def features(model, pixels: torch.Tensor, tiles: int) -> np.ndarray:
    """[n, tiles·tokens_per_tile·hidden] projected image features, one row per image."""
    out = [model.encode_images(pixels[i:i + 256]) for i in range(0, len(pixels), 256)]
    f = torch.cat(out)  # [n·tiles·t, H]
    n = len(pixels) // tiles
    return f.reshape(n, -1).numpy()


@torch.no_grad()
def geometry(model, val_set) -> dict:
    """(e): RMS, image-to-image variance share, digit-class share and mean cosine of the features."""
    n = len(val_set)
    f = torch.from_numpy(features(model, val_set.pixel_values, val_set.tiles_per_image))  # [n, tiles·t·H]
    mu = f.mean(0, keepdim=True)
    energy = f.pow(2).mean()
    class_means = torch.stack([f[val_set.targets == d].mean(0) for d in range(10)])  # [10, tiles·t·H]
    half = n // 2
    return {"rms": float(energy.sqrt()), "var_share": float((f - mu).pow(2).mean() / energy),
            "between_share": float((class_means - mu).pow(2).mean() / energy),
            "mean_cos": float(F.cosine_similarity(f[:half], f[half:2 * half]).mean())}


def probe(model, train_set, val_set) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xt = features(model, train_set.pixel_values, train_set.tiles_per_image)
    xv = features(model, val_set.pixel_values, val_set.tiles_per_image)
    sc = StandardScaler().fit(xt)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(sc.transform(xt), train_set.targets.numpy())
    return float(clf.score(sc.transform(xv), val_set.targets.numpy()))


def attention_to_patches(model, ids: torch.Tensor, pixels: torch.Tensor, patch_id: int) -> list[float]:
    """Per layer: mean attention weight that the last position puts on <|patch|> positions."""
    shares = []
    handles = []

    def hook(mod, args, kwargs, out):
        x, positions, rope = args[0], args[1], args[2]  # x [B, T, H]: the block's normed input
        q, k, _ = mod.project(x, positions, rope)  # q [B, T, h, D], k [B, T, kv, D] as the layer uses them
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        s = torch.einsum("bhd,bthd->bht", q[:, -1], k) / math.sqrt(mod.head_dim)  # [B, heads, T]
        w = s.softmax(-1)
        shares.append(float(w[:, :, (ids[0] == patch_id)].sum(-1).mean()))

    for layer in model.layers:
        handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(ids, pixel_values=pixels, logits_slice=slice(-1, None))
    finally:
        for h in handles:
            h.remove()
    return shares


def measure(model, train_set, val_set, patch_id: int) -> dict:
    ids, px, tgt = val_set.input_ids, val_set.pixel_values, val_set.targets
    cand = val_set.candidate_ids
    res = {}
    with torch.no_grad():
        logits = model(ids, pixel_values=px, logits_slice=slice(-1, None))[:, -1].float()  # [n, V]
        perm = torch.randperm(len(tgt), generator=torch.Generator().manual_seed(0))
        t = val_set.tiles_per_image
        shuffled_px = px.view(len(tgt), t, *px.shape[1:])[perm].flatten(0, 1)
        logits_sh = model(ids, pixel_values=shuffled_px, logits_slice=slice(-1, None))[:, -1].float()
    for name, lg in (("real", logits), ("shuffled", logits_sh)):
        res[f"digit_ce10_{name}"] = float(F.cross_entropy(lg[:, cand], tgt))
        res[f"digit_ce_vocab_{name}"] = float(F.cross_entropy(lg, cand[tgt]))
        res[f"digit_acc_{name}"] = float((lg[:, cand].argmax(-1) == tgt).float().mean())
    res["digit_mass_on_candidates"] = float(lg.softmax(-1)[:, cand].sum(-1).mean())
    res["attention_to_patches"] = [round(x, 4) for x in attention_to_patches(model, ids[:64], px[:64 * t], patch_id)]
    # (d) gradients of the digit-token loss (over the vocabulary), per part
    model.zero_grad(set_to_none=True)
    feats = model.encode_images(px[:128 * t])
    emb = model.language_model.model.embed_tokens.weight
    res["image_feature_rms"] = float(feats.detach().pow(2).mean().sqrt())
    res["token_embedding_rms"] = float(emb.detach().pow(2).mean().sqrt())
    lg = model(ids[:128], image_features=feats, logits_slice=slice(-1, None))[:, -1].float()
    F.cross_entropy(lg, cand[tgt[:128]]).backward()
    norms = {"vision_model": 0.0, "multi_modal_projector": 0.0, "language_model": 0.0}
    for n, p in model.named_parameters():
        if p.grad is not None:
            norms[n.split(".")[0]] += float(p.grad.pow(2).sum())
    res["grad_norm"] = {k: round(math.sqrt(v), 6) for k, v in norms.items()}
    model.zero_grad(set_to_none=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--val-images", type=int, default=500)
    ap.add_argument("--no-fresh", action="store_true", help="skip the random-init control")
    ap.add_argument("--quick", action="store_true", help="only (e) and the digit accuracy/CE of (b)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from herd.data import digit_eval_set
    from herd.tokenizer import load_tokenizer

    run = Path(args.run)
    tok = load_tokenizer(run)
    model = load(run, args.step)
    vc = model.config.vision
    train_set = None if args.quick else digit_eval_set(tok, vc, split="train", limit=args.train_images)
    val_set = digit_eval_set(tok, vc, split="val", limit=args.val_images)
    patch_id = model.config.image_token_index
    out = {"run": str(run), "step": args.step, "features": geometry(model, val_set)}
    if not args.quick:
        out.update(probe_acc=probe(model, train_set, val_set), **measure(model, train_set, val_set, patch_id))
    if not args.no_fresh:
        init = fresh(run)
        out["features_random_init"] = geometry(init, val_set)
        if not args.quick:
            out["probe_acc_random_init"] = probe(init, train_set, val_set)
    out["ln10"] = math.log(10)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
