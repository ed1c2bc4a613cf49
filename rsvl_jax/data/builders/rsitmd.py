"""RSITMD (Yuan et al. 2022): 4,743 images, 5 captions each, 32 classes (33 file-name prefixes),
official split train 4,291 / test 452; PIR's own lists split train/val/test 3,435/856/452."""
from rsvl_jax.data.builders.karpathy import KarpathyPirBuilder


class Rsitmd(KarpathyPirBuilder):
    """RSITMD from the user's local copy (``manual_dir``)."""

    KARPATHY_FILE = "dataset_RSITMD.json"
    PIR_PREFIX = "rsitmd"
    IMAGE_DIRS = ("images", "RSITMD_images")
    ENCODINGS = ("utf-8", "gb18030")  # harmless for a clean UTF-8 file; reported if used
    HOMEPAGE = "https://github.com/xiaoyuan1996/AMFMN/tree/master/RSITMD"
    DESCRIPTION = ("RSITMD remote-sensing image-text retrieval dataset. With the 'karpathy' config "
                   "labels index the sorted file-name prefixes; with 'pir' they are PIR's ids.")
    CITATION = """@article{yuan2022exploring,
  title={Exploring a Fine-Grained Multiscale Method for Cross-Modal Remote Sensing Image Retrieval},
  author={Yuan, Zhiqiang and others},
  journal={IEEE Transactions on Geoscience and Remote Sensing}, year={2022}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
Download RSITMD yourself (https://github.com/xiaoyuan1996/AMFMN/tree/master/RSITMD) and pass its
folder as manual_dir. Config 'karpathy' (the builder's default when no config is named; note
that configs/pir.py asks for 'pir' unless pir_format=False) expects:
  <manual_dir>/dataset_RSITMD.json         the Karpathy-style annotation file (train/test splits)
  <manual_dir>/images/*.tif                the 4,743 images (or <manual_dir>/)
Config 'pir' expects PIR's own lists instead (rsitmd_test.json required; rsitmd_train.json and
rsitmd_val.json used when present) in <manual_dir>, with images found at <manual_dir>/<image field>
(e.g. train/bridge_942.tif) or by file name in images/ or <manual_dir>/.
"""
