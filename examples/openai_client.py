"""The OpenAI Python client against a local raylane cluster (`raylane up` serves the API on port 8000).

    raylane model make-tiny --arch llama --out /tmp/tiny-llama
    raylane up && raylane deploy examples/chat.yaml
    python examples/openai_client.py                      # the key comes from the cluster file `up` wrote

`--base-url` and `--api-key` point it elsewhere (e.g. a router pod behind `kubectl port-forward`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import openai


def default_api_key(state_dir: Path) -> str:
    """The `default` tenant's key that `raylane up` saved in its cluster file."""
    cluster = json.loads((state_dir.expanduser() / "cluster.json").read_text())
    return cluster["api_key"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=None, help="default: the key in ~/.raylane/cluster.json")
    parser.add_argument("--state-dir", type=Path, default=Path("~/.raylane"))
    parser.add_argument("--model", default="chat", help="a deployment, a tier group, or deployment:adapter")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or default_api_key(args.state_dir))

    print("models:", [model.id for model in client.models.list()])

    completion = client.completions.create(model=args.model, prompt="The cluster", max_tokens=16, temperature=0)
    print("completion:", repr(completion.choices[0].text), completion.usage)

    print("chat (streamed): ", end="")
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "Tell me a story about a river."}],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage is not None:
            print(f"\nusage: {chunk.usage}")

    try:
        client.completions.create(model="no-such-model", prompt="hi")
    except openai.NotFoundError as exc:
        print("unknown model ->", exc.status_code, exc.body)


if __name__ == "__main__":
    main()
