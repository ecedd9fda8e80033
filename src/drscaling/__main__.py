from drscaling.cli import main

raise SystemExit(main())
