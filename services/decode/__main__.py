from services.decode.server import main

raise SystemExit(main())
