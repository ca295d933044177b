// Unit tests for the panel's pure logic (api, formatting, SSE parsing, state).
// They run on Node with ts-jest; nothing here needs a browser or JupyterLab.
module.exports = {
  testEnvironment: 'node',
  roots: ['<rootDir>/src'],
  testMatch: ['**/__tests__/**/*.spec.ts'],
  transform: {
    '^.+\\.tsx?$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }]
  }
};
