"""Print `name==version` for Ray and every installed package it depends on (through any of its extras),
so that installing other packages cannot move them: `pip install -c ray-constraints.txt ...`.
Used by the Dockerfile on Ray's own image; run it anywhere Ray is installed."""

import re
from importlib.metadata import PackageNotFoundError, distribution


def ray_closure(root: str = "ray") -> dict[str, str]:
    pinned, todo = {}, [root]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in pinned:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # an extra's dependency the image does not have: nothing to hold
            continue
        pinned[key] = dist.version
        todo.extend(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0] for req in dist.requires or [])
    return pinned


if __name__ == "__main__":
    for name, version in sorted(ray_closure().items()):
        print(f"{name}=={version}")
