from services.encode.server import main

raise SystemExit(main())
