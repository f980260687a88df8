"""OSV advisories planted by the tests (https://ossf.github.io/osv-schema/), one JSON or YAML file each."""

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def advisory(advisory_id: str, name: str, *ranges: Sequence[Dict[str, str]], ecosystem: str = "PyPI",
             severity: Optional[str] = None, versions: Sequence[str] = (), cve: Optional[str] = None) -> dict:
    """An OSV record on one package: each range is its list of events, e.g. [{"introduced": "0"}, {"fixed": "2"}]."""
    affected = {"package": {"ecosystem": ecosystem, "name": name},
                "ranges": [{"type": "ECOSYSTEM", "events": list(events)} for events in ranges]}
    if versions:
        affected["versions"] = list(versions)
    record = {"schema_version": "1.6.0", "id": advisory_id, "modified": "2026-12-01T00:00:00Z",
              "summary": "planted by the test suite", "affected": [affected], "aliases": [cve] if cve else []}
    if severity:
        record["database_specific"] = {"severity": severity.upper()}
    return record


def fixed(before: str, introduced: str = "0") -> List[Dict[str, str]]:
    return [{"introduced": introduced}, {"fixed": before}]


def plant(directory: Path, *records: dict) -> Path:
    """Write each record where an OSV export puts it: DIR/<ecosystem>/<id>.json."""
    for record in records:
        ecosystem = record["affected"][0]["package"]["ecosystem"].split(":")[0]
        (directory / ecosystem).mkdir(parents=True, exist_ok=True)
        (directory / ecosystem / (record["id"] + ".json")).write_text(json.dumps(record))
    return directory
