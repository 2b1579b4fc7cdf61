"""``hf-freeze``: command-line entry point.

    hf-freeze inspect MODEL [--freeze VALUE | --policy STRING] [--json]

MODEL is a Hub id, a local folder, or ``tiny:<model_type>`` (a tiny random config of any type in
transformers' image-classification mapping). Only the config is read; the model is built on the
meta device, so inspecting a large model costs no memory and downloads no weights.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import FreezePolicyError, UnsupportedModelError


def _inspect(args) -> int:
    from .apply import apply_policy
    from .groups import layer_groups
    from .loading import build_classifier
    from .policy import FreezePolicy

    try:
        policy = FreezePolicy.from_string(args.policy) if args.policy else FreezePolicy(freeze=args.freeze)
        model = build_classifier(args.model)
        groups = layer_groups(model)
        if policy.adapter is None:
            report = apply_policy(model, policy)
        else:  # preview which layers get adapters (on the meta device: nothing is allocated)
            from .adapters import add_adapter
            from .report import freeze_report

            report = freeze_report(add_adapter(model, policy))
    except (FreezePolicyError, UnsupportedModelError, KeyError, OSError) as e:
        print(f"hf-freeze: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"groups": [{"name": g.name, "num_params": g.num_params, "param_names": list(g.param_names)}
                                     for g in groups], "report": report.to_dict()}, indent=2))
        return 0
    print(f"{args.model}: {type(model).__name__}, {len(groups)} groups (from {groups.source})")
    for g in groups:
        first, last = g.param_names[0], g.param_names[-1]
        print(f"  {g.name:<10} {g.num_params:>12,}  {first}{' ... ' + last if last != first else ''}")
    print()
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-freeze", description="Verified layer freezing for HF image classifiers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print a model's layer groups and preview a freeze policy")
    p.add_argument("model", help="Hub id, local folder, or tiny:<model_type>")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--freeze", default="backbone",
                       help="freeze value to preview: backbone | none | N | selectors (default: backbone)")
    group.add_argument("--policy", help="a whole policy string, e.g. 'freeze=stem:stage.2;unfreeze=epoch2:1@0.1'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    return {"inspect": _inspect}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
