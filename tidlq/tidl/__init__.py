"""What TIDL needs: target devices, operator rules, the lint of a QDQ model, compile options."""
