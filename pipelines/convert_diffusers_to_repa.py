"""Export a `SiTTransformer2DModel` folder back to the original REPA state-dict layout.

The result loads into the original code's `SiT` (`model.load_state_dict(torch.load(path))`).

Example:
    python pipelines/convert_diffusers_to_repa.py --model sit-xl-repa/transformer --output last.pt
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusers_repa.conversion import export_to_repa_state_dict
from diffusers_repa.models import SiTTransformer2DModel


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder written by save_pretrained (or a Hub id)")
    parser.add_argument("--subfolder", default=None, help="e.g. 'transformer' inside a pipeline folder")
    parser.add_argument("--output", required=True, help="'.pt' (torch.save) or '.safetensors'")
    args = parser.parse_args(argv)

    model = SiTTransformer2DModel.from_pretrained(args.model, subfolder=args.subfolder)
    state_dict = {key: value.contiguous() for key, value in export_to_repa_state_dict(model).items()}
    output = Path(args.output)
    if output.suffix == ".safetensors":
        save_file(state_dict, str(output))
    else:
        torch.save(state_dict, output)
    print(f"Wrote {len(state_dict)} tensors in the original REPA layout to {output}.")


if __name__ == "__main__":
    main()
