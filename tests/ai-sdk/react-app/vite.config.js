// The useChat app of tests/test_use_chat.py, built as Vite builds any React app. PARLEY_AI_SDK=ai6 builds it
// against the AI SDK 6 (the npm aliases ai6 and ai-sdk-react6 of ../package.json, which is what npm installs on
// Node 20) instead of 7: the app's imports stay `ai` and `@ai-sdk/react`, as a newcomer writes them.
import { defineConfig } from 'vite';

const six = process.env.PARLEY_AI_SDK === 'ai6';

export default defineConfig({
  base: './', // the test serves it under any path of parley's origin
  logLevel: 'warn',
  resolve: {
    alias: six
      ? [
          { find: /^ai$/, replacement: 'ai6' }, // @ai-sdk/react 3's own `import ... from 'ai'` too: one copy of 6
          { find: /^@ai-sdk\/react$/, replacement: 'ai-sdk-react6' },
        ]
      : [],
  },
  build: {
    rolldownOptions: {
      // swr's 'use client' (for server components) means nothing in a browser-only bundle.
      onwarn(warning, warn) {
        if (warning.code !== 'MODULE_LEVEL_DIRECTIVE') warn(warning);
      },
    },
  },
});
