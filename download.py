"""Download Meta-format Llama weights from the Hugging Face Hub, verified and resumable.

    python download.py --model_name meta-llama/Llama-2-7b
    python download.py --model_name meta-llama/Llama-3.1-8B     # files under original/

Prints the folder to pass to convert_checkpoints.py --original_ckpt_dir (on stdout; status on stderr).
Gated repositories need access granted on the model page and a token: `hf auth login`, HF_TOKEN or --token.
"""

import argparse
import sys
from pathlib import Path

from llama.errors import UserError
from llama.hub import download, say


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", required=True, help="repository id, e.g. meta-llama/Llama-2-7b")
    p.add_argument("--model_path", "-o", type=Path, default=Path("model"),
                   help="Hugging Face cache folder to download into (default: model)")
    p.add_argument("--revision", default="main", help="branch, tag or commit hash (default: main)")
    p.add_argument("--token", help="Hub access token (visible in ps: prefer HF_TOKEN, the token saved by "
                   "`hf auth login`, or --token_file)")
    p.add_argument("--token_file", type=Path, help="read the Hub access token from this file")
    p.add_argument("--include", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="fetch files matching these patterns too, e.g. '*.safetensors' (besides the "
                        "Meta-format files, licences and checklists)")
    p.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="skip files matching these patterns")
    p.add_argument("--max_workers", type=int, default=8, help="files downloaded in parallel (default: 8)")
    p.add_argument("--force_download", action="store_true",
                   help="download every file again, e.g. after a failed verification")
    p.add_argument("--skip_verify", action="store_true", help="do not hash the files after the download")
    return p.parse_args()


def token(args: argparse.Namespace) -> str | None:
    """--token or --token_file (not both), or None for huggingface_hub's own (HF_TOKEN, then the
    saved login); an empty one is an error rather than an anonymous download."""
    if args.token is not None and args.token_file is not None:
        raise UserError("pass --token or --token_file, not both")
    if args.token_file is not None:
        try:
            value, source = args.token_file.read_text().strip(), f"--token_file {args.token_file}"
        except OSError as e:
            raise UserError(f"--token_file {args.token_file}: cannot read it ({e.strerror})") from None
    elif args.token is not None:
        value, source = args.token, "--token"
    else:
        return None
    if not value:
        raise UserError(f"{source}: the token is empty; give a token, or neither flag to use HF_TOKEN or "
                        "`hf auth login`")
    return value


def main() -> None:
    args = parse_args()
    if args.max_workers < 1:
        raise UserError(f"--max_workers {args.max_workers}: use at least 1")
    folder = download(args.model_name, args.model_path, revision=args.revision, token=token(args),
                      include=args.include, exclude=args.exclude, max_workers=args.max_workers,
                      force_download=args.force_download, verify=not args.skip_verify)
    say(f"next: torchrun --nproc_per_node N convert_checkpoints.py --original_ckpt_dir {folder} "
        "--save_checkpoint_dir converted_checkpoints")
    print(folder)


if __name__ == "__main__":
    # The shape of llama.distributed.run_cli, without importing torch for a download.
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
