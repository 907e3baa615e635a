from nitro.cli import main

raise SystemExit(main())
