from services.router.server import main

raise SystemExit(main())
