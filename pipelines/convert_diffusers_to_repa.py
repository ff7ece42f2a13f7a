"""Export a `SiTTransformer2DModel` or `MMDiTTransformer2DModel` folder back to the original REPA state-dict layout.

The model class is read from the folder's config.json (`_class_name`). The result loads into the original code's
`SiT` or `MMDiT` (`model.load_state_dict(torch.load(path))`).

Examples:
    python pipelines/convert_diffusers_to_repa.py --model sit-xl-repa/transformer --output last.pt
    python pipelines/convert_diffusers_to_repa.py --model mmdit-repa --subfolder transformer --output mmdit.pt

A mistake (a missing model folder, a folder holding another class, an output format other than .pt/.safetensors)
ends with one ``convert_diffusers_to_repa.py: error: ...`` line (exit status 2) before the model is loaded.
"""

import argparse
import sys
from pathlib import Path

from diffusers_repa.cli import run_cli
from diffusers_repa.pretrained_paths import check_pretrained_source

OUTPUT_SUFFIXES = (".pt", ".pth", ".safetensors")
MODEL_CLASSES = ("SiTTransformer2DModel", "MMDiTTransformer2DModel")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder written by save_pretrained (or a Hub id)")
    parser.add_argument("--subfolder", default=None, help="e.g. 'transformer' inside a pipeline folder")
    parser.add_argument("--output", required=True, help="'.pt' (torch.save) or '.safetensors'")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.suffix not in OUTPUT_SUFFIXES or output.is_dir():
        raise ValueError(f"--output {args.output}: give a file name ending in {', '.join(OUTPUT_SUFFIXES)}.")
    # A local folder (with --subfolder inside it) must hold the model's config.json; a Hub id is left to the Hub.
    local = Path(args.model) / (args.subfolder or "")
    check_pretrained_source(
        local if Path(args.model).exists() else args.model, config_name="config.json", what="model"
    )
    import torch
    from safetensors.torch import save_file

    from diffusers_repa.conversion import export_to_repa_state_dict
    from diffusers_repa.conversion_mmdit import export_to_mmdit_state_dict
    from diffusers_repa.models import SiTTransformer2DModel
    from diffusers_repa.models.transformer_mmdit import MMDiTTransformer2DModel

    class_name = SiTTransformer2DModel.load_config(args.model, subfolder=args.subfolder).get("_class_name")
    if class_name not in MODEL_CLASSES:
        raise ValueError(
            f"{local} holds a model of class {class_name}, not one of {', '.join(MODEL_CLASSES)}"
            + ("; a pipeline folder's transformer is exported with --subfolder transformer." if class_name else ".")
        )
    if class_name == "MMDiTTransformer2DModel":
        model = MMDiTTransformer2DModel.from_pretrained(args.model, subfolder=args.subfolder)
        state_dict = export_to_mmdit_state_dict(model)
    else:
        model = SiTTransformer2DModel.from_pretrained(args.model, subfolder=args.subfolder)
        state_dict = export_to_repa_state_dict(model)
    state_dict = {key: value.contiguous() for key, value in state_dict.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".safetensors":
        save_file(state_dict, str(output))
    else:
        torch.save(state_dict, output)
    print(f"Wrote {len(state_dict)} tensors of the {class_name} in the original REPA layout to {output}.")


if __name__ == "__main__":
    sys.exit(run_cli(main))
