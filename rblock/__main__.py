from rblock.cli import main

raise SystemExit(main())
