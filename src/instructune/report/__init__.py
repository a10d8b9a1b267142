"""Report: results.json, report.md (and the HTML report)."""
