"""``python -m monitor.simulator``: see :func:`monitor.simulator.scenario.main`."""

from monitor.simulator.scenario import main

raise SystemExit(main())
