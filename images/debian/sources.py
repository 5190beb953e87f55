#!/usr/bin/env python3
"""Picks the apt sources of the Debian root file system from the host's (images/debian/build.sh).

    sources.py SUITE SOURCELIST SOURCEPARTS OUTDIR

Reads the host's active sources (SOURCELIST, e.g. /etc/apt/sources.list, in the one-line format;
SOURCEPARTS/*.list and SOURCEPARTS/*.sources, deb822) and writes the root's into OUTDIR, in the
places apt reads them: OUTDIR/sources.list and OUTDIR/sources.list.d/NAME.
  - A host file whose entries are all Debian archive entries for SUITE (SUITE, SUITE-updates,
    SUITE-security, SUITE-backports...) is copied as it is (same name, same bytes), so the root's
    apt uses the mirror, and the options, that the host's does.
  - Such entries in a file that also has others (a third-party repository, another release: their
    keys are not in the root) are written to sources.list.d/debian.sources.
  - With no entry for SUITE (a host on another release), the host's Debian mirrors serve SUITE:
    SUITE and SUITE-updates from each archive mirror, SUITE-security from each security mirror.
  - With no Debian mirror at all (another distribution), $DEBIAN_MIRROR or deb.debian.org.
$DEBIAN_MIRROR (a URI) replaces all this with that one mirror (e.g. a local cache).
Prints "URI SUITE" for each mirror and suite the root uses, and explains on stderr what it left out.
"""
import os
import re
import sys
from urllib.parse import urlparse

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def note(msg):
    print(f"debian: {msg}", file=sys.stderr)


def one_line_entries(text):
    """Entries of a one-line-style sources.list: dicts with types, uris, suites, components."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        opts = {}
        m = re.match(r"^(\S+)\s+\[([^\]]*)\]\s+(.*)$", line)
        if m:
            typ, optstr, rest = m.group(1), m.group(2), m.group(3)
            for o in optstr.split():
                if "=" in o:
                    k, v = o.split("=", 1)
                    opts[k.lower()] = v
        else:
            typ, _, rest = line.partition(" ")
        words = rest.split()
        if len(words) < 2:
            continue
        out.append({"types": [typ], "uris": [words[0]], "suites": [words[1]],
                    "components": words[2:], "signed-by": opts.get("signed-by"),
                    "enabled": True})
    return out


def deb822_entries(text):
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "uris" not in fields:
            continue
        out.append({"types": fields.get("types", "").split(), "uris": fields["uris"].split(),
                    "suites": fields.get("suites", "").split(),
                    "components": fields.get("components", "").split(),
                    "signed-by": fields.get("signed-by"),
                    "enabled": fields.get("enabled", "yes").lower() not in ("no", "false", "0")})
    return out


def archive_kind(uri):
    """'debian' or 'debian-security' for a Debian archive mirror, else None."""
    u = urlparse(uri)
    path = u.path.rstrip("/")
    if re.search(r"/debian-security(/|$)", path + "/") or (u.hostname or "") == "security.debian.org":
        return "debian-security"
    if re.search(r"/debian(/|$)", path + "/") or (u.hostname or "").endswith("debian.org"):
        return "debian"
    return None


def main():
    suite, sourcelist, sourceparts, outdir = sys.argv[1:5]
    family = re.compile(rf"^{re.escape(suite)}([-/](updates|security|backports|proposed-updates))?$")

    def ours(e):
        return (all(archive_kind(u) for u in e["uris"]) and e["suites"]
                and all(family.match(s) for s in e["suites"]))

    files = []
    if os.path.isfile(sourcelist):
        files.append((sourcelist, "sources.list", one_line_entries))
    if os.path.isdir(sourceparts):
        for n in sorted(os.listdir(sourceparts)):
            if n.endswith(".list"):
                files.append((os.path.join(sourceparts, n), "sources.list.d/" + n, one_line_entries))
            elif n.endswith(".sources"):
                files.append((os.path.join(sourceparts, n), "sources.list.d/" + n, deb822_entries))

    copies, picked, mirrors = [], [], {}
    if os.environ.get("DEBIAN_MIRROR"):
        picked = [{"types": ["deb"], "uris": [os.environ["DEBIAN_MIRROR"]], "suites": [suite],
                   "components": ["main"], "signed-by": KEYRING, "enabled": True}]
        note(f"DEBIAN_MIRROR: {os.environ['DEBIAN_MIRROR']} instead of the host's sources")
    else:
        for path, dest, parse in files:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError as err:
                note(f"cannot read {path}: {err}")
                continue
            entries = [e for e in parse(text) if e["enabled"] and "deb" in e["types"]]
            mine = [e for e in entries if ours(e)]
            for e in entries:
                for u in e["uris"]:
                    k = archive_kind(u)
                    if k:
                        mirrors.setdefault(k, {}).setdefault(u, set()).update(e["components"])
            if entries and len(mine) == len(entries):
                copies.append((path, dest))
            else:
                if mine:
                    picked.extend(mine)
                left = len(entries) - len(mine)
                if left:
                    note(f"not in the root: {left} entr{'y' if left == 1 else 'ies'} of {path} "
                         f"(not the Debian archive for {suite})")
        if not copies and not picked:
            main_mirrors = mirrors.get("debian") or {}
            if not main_mirrors:
                main_mirrors = {"http://deb.debian.org/debian": {"main"}}
                note("the host's apt has no Debian mirror: using http://deb.debian.org/debian "
                     "(set DEBIAN_MIRROR for another)")
            for u, comps in main_mirrors.items():
                picked.append({"types": ["deb"], "uris": [u], "suites": [suite, f"{suite}-updates"],
                               "components": sorted(comps) or ["main"], "signed-by": KEYRING,
                               "enabled": True})
            for u, comps in (mirrors.get("debian-security") or {}).items():
                picked.append({"types": ["deb"], "uris": [u], "suites": [f"{suite}-security"],
                               "components": sorted(comps) or ["main"], "signed-by": KEYRING,
                               "enabled": True})
            note(f"the host's apt has no {suite} entries: {suite} from its Debian mirrors")

    os.makedirs(os.path.join(outdir, "sources.list.d"), exist_ok=True)
    used = []
    for path, dest in copies:
        with open(path, "rb") as f, open(os.path.join(outdir, dest), "wb") as g:
            g.write(f.read())
        text = open(path, encoding="utf-8").read()
        used += (one_line_entries if dest.endswith(".list") else deb822_entries)(text)
    if picked:
        stanzas = []
        for e in picked:
            s = (f"Types: deb\nURIs: {' '.join(e['uris'])}\nSuites: {' '.join(e['suites'])}\n"
                 f"Components: {' '.join(e['components'])}\n")
            s += f"Signed-By: {e['signed-by'] or KEYRING}\n"
            stanzas.append(s)
        name = "debian.sources"
        while any(d == f"sources.list.d/{name}" for _, d in copies):
            name = "uvm-" + name
        with open(os.path.join(outdir, "sources.list.d", name), "w", encoding="utf-8") as g:
            g.write("\n".join(stanzas))
        used += picked
    seen = set()
    for e in used:
        if not e["enabled"] or "deb" not in e["types"]:
            continue
        for u in e["uris"]:
            for s in e["suites"]:
                if (u, s) not in seen:
                    seen.add((u, s))
                    print(u, s)


if __name__ == "__main__":
    main()
