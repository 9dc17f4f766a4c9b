"""Classify images with a trained run: python predict.py RUN_DIR IMAGE_OR_FOLDER... [--top K] \
[--json]

The run is rebuilt as it was trained (runs.load_run: method, config, classes, learned parameters);
each image is preprocessed as CLIP's evaluation does, and the K most probable of the run's classes
are printed (softmax of the method's logits). A folder stands for every image below it, sorted. An
image that cannot be read is reported on stderr and skipped; the others are still predicted (exit
status 1 if any was skipped, 2 if the run cannot load).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import clip_model
import data
import methods
import runs

def image_files(paths):
    """The files named, and every image file below the folders named (sorted); missing paths are
    returned apart."""
    files, missing = [], []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(file for file in path.rglob("*")
                            if file.is_file() and file.suffix.lower() in data.IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            missing.append(path)
    return files, missing

@torch.no_grad()
def predict(model, preprocess, classnames, files, top, batch_size=32):
    """[{"image", "top": [{"class", "probability"}]}] for the readable files, and [(file, reason)]
    for the others."""
    device = next(model.parameters()).device
    predictions, skipped = [], []
    for start in range(0, len(files), batch_size):
        readable, images = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(preprocess(data.open_image(path)))
                readable.append(path)
            except data.DataError as e:
                skipped.append((path, str(e)))
        if not images:
            continue
        logits = model(torch.stack(images).to(device)).float()  # (B, C)
        if not torch.isfinite(logits).all():
            raise methods.UserError("the run's model gives nan or inf logits: its parameters are "
                                    "broken (a diverged run); train it again with a lower --lr")
        probabilities = logits.softmax(-1)
        values, indices = probabilities.topk(min(top, len(classnames)), dim=-1)
        for path, top_probabilities, top_classes in zip(readable, values.tolist(),
                                                        indices.tolist()):
            best = [{"class": classnames[c], "probability": probability}
                    for c, probability in zip(top_classes, top_probabilities)]
            predictions.append({"image": str(path), "top": best})
    return predictions, skipped

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run",
                        help="the folder of a run of train.py (its results.json and checkpoint.pt)")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--top", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON list instead of a line per image")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top {args.top}: must be 1 or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    try:
        model, preprocess, classnames = runs.load_run(args.run, args.device)
        files, missing = image_files(args.images)
        if not files and not missing:  # folders without a single image
            raise methods.UserError(f"no image files ({' '.join(data.IMAGE_SUFFIXES)}) "
                                    f"in {' '.join(args.images)}")
        predictions, skipped = predict(model, preprocess, classnames, files, args.top)
    except (methods.UserError, data.DataError, clip_model.LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    for path in missing:
        print(f"skipped {path}: no such file or folder", file=sys.stderr)
    for path, reason in skipped:
        # "cannot read image ...", from data.open_image
        print(f"skipped {path}: {reason}", file=sys.stderr)
    try:
        if args.json:
            print(json.dumps(predictions, indent=1))
        else:
            for prediction in predictions:
                top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in prediction["top"])
                print(f"{prediction['image']}: {top}")
        sys.stdout.flush()  # a closed pipe raises here, not in the interpreter's exit
    # `| head`: the reader took what it wanted; the status is the predictions' own
    except BrokenPipeError:
        methods.output_closed()
    return 1 if missing or skipped else 0

if __name__ == "__main__":
    sys.exit(main())
