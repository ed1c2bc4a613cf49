"""RSICD (Lu et al. 2017): 10,921 images, 5 captions each, 30 scene classes, 8734/1094/1093 split."""
from rsvl_jax.data.builders.karpathy import (
    BITA_CONFIG, KARPATHY_CONFIG, PIR_CONFIG, KarpathyPirBuilder)


class Rsicd(KarpathyPirBuilder):
    """RSICD from the user's local copy (``manual_dir``): retrieval (PIR) and captioning (BITA)
    read the same examples; the config only says which annotation files give the splits."""

    BUILDER_CONFIGS = [KARPATHY_CONFIG, PIR_CONFIG, BITA_CONFIG]
    BITA_PREFIX = "RSICD"

    KARPATHY_FILE = "dataset_rsicd.json"
    PIR_PREFIX = "rsicd"
    IMAGE_DIRS = ("RSICD_images", "images")
    # Some captions are not valid UTF-8; other ports read the file as gb18030. We try UTF-8
    # first and fall back to gb18030 for the whole file, logging it and recording the encoding
    # in info.metadata["annotation_encoding"].
    ENCODINGS = ("utf-8", "gb18030")
    HOMEPAGE = "https://github.com/201528014227051/RSICD_optimal"
    DESCRIPTION = ("RSICD remote-sensing image captioning / retrieval dataset. Labels come from the "
                   "file-name prefix; the ~8% of images named only by a number get label -1.")
    CITATION = """@article{lu2017exploring,
  title={Exploring Models and Data for Remote Sensing Image Caption Generation},
  author={Lu, Xiaoqiang and Wang, Binqiang and Zheng, Xiangtao and Li, Xuelong},
  journal={IEEE Transactions on Geoscience and Remote Sensing}, year={2017}}"""
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
Download RSICD yourself (https://github.com/201528014227051/RSICD_optimal) and pass its folder as
manual_dir. Config 'karpathy' (the builder's default when no config is named; note that
configs/pir.py asks for 'pir' unless pir_format=False) expects:
  <manual_dir>/dataset_rsicd.json          the Karpathy-style annotation file
  <manual_dir>/RSICD_images/*.jpg          the 10,921 images (or <manual_dir>/images/, or <manual_dir>/)
Config 'pir' expects PIR's own lists instead (rsicd_test.json required; rsicd_train.json and
rsicd_val.json used when present) in <manual_dir>, with images found at <manual_dir>/<image field>
(e.g. train/airport_1.jpg) or by file name in RSICD_images/, images/ or <manual_dir>/.
Config 'bita' expects BITA's own lists (from the BITA authors' download) instead:
  <manual_dir>/annotations/RSICD_train.json     rows {"image", "caption", "image_id"}
  <manual_dir>/annotations/RSICD_val.json       rows {"image", ...} (and RSICD_test.json)
  <manual_dir>/annotations/RSICD_val_gt.json    COCO-format references (and RSICD_test_gt.json)
  images under <manual_dir>/images/ (or RSICD_images/, or <manual_dir>/); the lists may also
  sit directly in <manual_dir>. Any subset of train/val/test works (pre-training needs train).
"""
