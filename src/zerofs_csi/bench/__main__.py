"""``python -m zerofs_csi.bench``: every benchmark, the table, the JSON and the chart."""

from zerofs_csi.bench.suite import main

raise SystemExit(main())
