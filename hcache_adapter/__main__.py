from hcache_adapter.cli import main

raise SystemExit(main())
