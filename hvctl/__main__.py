from hvctl.cli import main

raise SystemExit(main())
