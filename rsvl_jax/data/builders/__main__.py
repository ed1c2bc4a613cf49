"""Build a dataset once: python -m rsvl_jax.data.builders NAME --data_dir D [--manual_dir M]
[--config C] [--on_error raise|skip]. Prints the splits and the build report."""
import argparse
import json

from rsvl_jax.data import builders


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("name", choices=sorted(builders.BUILDERS))
    ap.add_argument("--data_dir", required=True, help="where the array_record dataset goes")
    ap.add_argument("--manual_dir", help="your downloaded annotation file(s) and images")
    ap.add_argument("--config", help="e.g. karpathy | pir (rsicd, rsitmd) | bita (rsicd, ucm_captions, "
                    "nwpu_captions, sydney_captions); tiny | demo | caption_demo | large (synthetic)")
    ap.add_argument("--on_error", default="raise", choices=["raise", "skip"])
    args = ap.parse_args(argv)
    b = builders.build(args.name, args.data_dir, config=args.config, manual_dir=args.manual_dir,
                       on_error=args.on_error)
    print(b.data_dir)
    print({s: info.num_examples for s, info in b.info.splits.items()})
    print(json.dumps(b.info.metadata.get("build_report", {}), indent=1))


if __name__ == "__main__":
    main()
