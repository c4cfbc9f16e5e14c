"""Which route carries an attribute into a FLUX model: T5's tokens or CLIP's pooled vector?

    python -m demo.flux_routes                      # shapes-flux and shapes-flux-b, style task
    python -m demo.flux_routes --models flux --tasks style,colour

FLUX.1 conditions its transformer on T5's token sequence (the blocks' text stream) and on CLIP's pooled
vector (``time_text_embed``, every block's modulation). This generates the source prompts, the target
prompts, and the two swaps (target tokens with source pooled vector, and the reverse) with the same seeds,
and scores them with the model's classifier: the route whose swap reaches the target is the one that
carries the attribute. It is why the FLUX default preset hooks the pooled-text projection as well as the
blocks (docs/protocol.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from .paths import load_demo_classifier
from .protocols import EVAL_SEED, MODELS, check_names, load_model_pipeline, score_images, tasks


def generate_from_embeddings(pipe, model, tokens: torch.Tensor, pooled: torch.Tensor) -> np.ndarray:
    """uint8 images from given T5 tokens and pooled CLIP vectors, image i with seed EVAL_SEED + i."""
    generators = [torch.Generator().manual_seed(EVAL_SEED + i) for i in range(len(tokens))]
    images = pipe(
        prompt_embeds=tokens,
        pooled_prompt_embeds=pooled,
        num_inference_steps=model.steps,
        guidance_scale=1.0,
        generator=generators,
        output_type="np",
    ).images
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m demo.flux_routes", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="flux,flux-b")
    parser.add_argument("--tasks", default="style,colour")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    flux_models = [name for name, model in MODELS.items() if model.family == "flux"]
    names, task_names = args.models.split(","), args.tasks.split(",")
    check_names(parser, names, flux_models, "FLUX model")
    check_names(parser, task_names, list(tasks()), "task")
    for name in names:
        model = MODELS[name]
        pipe = load_model_pipeline(model)
        classifier = load_demo_classifier(model.classifier)
        for task_name in task_names:
            task = tasks()[task_name]
            length = model.sampling["max_sequence_length"]
            source_tokens, source_pooled, _ = pipe.encode_prompt(
                list(task.source), None, max_sequence_length=length
            )
            target_tokens, target_pooled, _ = pipe.encode_prompt(
                list(task.target), None, max_sequence_length=length
            )
            cases = {
                "source prompt": (source_tokens, source_pooled),
                "target prompt": (target_tokens, target_pooled),
                "target tokens, source pooled": (target_tokens, source_pooled),
                "source tokens, target pooled": (source_tokens, target_pooled),
            }
            for case, (tokens, pooled) in cases.items():
                scores = score_images(classifier, generate_from_embeddings(pipe, model, tokens, pooled), task)
                rows.append({"model": name, "task": task_name, "case": case, **scores})
                print(
                    f"| {name} | {task_name} | {case} | {scores['score']:.2f} | {scores['shape']:.2f} |",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
